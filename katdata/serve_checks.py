"""What `katdata serve` serves, what it checks before it starts anything, and the one line that says
why vLLM failed.

``resolve_target`` turns PATH into (model, adapter): a model folder or name, a run folder (its
train/merged model, or its base model with train/adapter; without train output a RunFolderError), a
train output folder or a peft adapter folder; ``lora_args`` are the flags that serve an adapter un-merged.

Each check takes well under a second and imports neither torch nor vLLM: the port (1-65535 and free to
bind on the host, bound the way vLLM binds it), the ``--log`` file's folder, and the model reference:
a local folder (or GGUF file), or a Hub model id that is in the Hub cache or that the Hub has. So a
typo such as ``runs/nope`` or a busy port is one line on stderr at once, not vLLM's traceback half a
minute later. ``failure_line`` picks the line of a vLLM log that says why the server died: the root
exception, not the traceback around it nor vLLM's "see root cause above".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Optional

from katdata.errors import EngineError, InputError, KatdataError, RunFolderError
from katdata.preflight import missing_path, model_problem
from katdata.run_folder import FILES

log = logging.getLogger(__name__)

MAX_LINE = 300  # characters of the log line quoted in an error
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROC_PREFIX = re.compile(r"^\(\w+(?: pid=\d+)?\)\s?")  # vLLM's "(APIServer pid=12) " / "(EngineCore_DP0 pid=34) "
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Fault)\b(?::\s.*)?$")
ERROR_LOG = re.compile(r"^(?:ERROR|CRITICAL)\s+\d\d-\d\d [\d:.]+\s+\[[^\]]*\]\s*(.+)$")
GENERIC = ("root cause", "see stack trace")  # vLLM's wrappers that point at the real exception above them
RUN_FILES = tuple(FILES[k] for k in ("summary", "recipe", "queries", "records"))  # what shows a folder is a run folder


def check_port(port: Optional[int], host: str = "127.0.0.1") -> None:
    """Refuse a port outside 1-65535 or one that cannot be bound on ``host`` now (in use, privileged).

    The port is bound with SO_REUSEADDR, as vLLM binds it (so a port in TIME_WAIT counts as free), and
    released at once. None means katdata picks a free port: nothing to check."""
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise KatdataError(f"--port {port}: a TCP port is 1-65535 (leave --port out for a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise KatdataError(f"--host {host}: not a known address ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise KatdataError(f"--port {port}: already in use on {host} (another server?); pick another port "
                               "or leave --port out for a free one") from None
        if exc.errno == errno.EACCES:
            raise KatdataError(f"--port {port}: not allowed to bind it on {host} (ports below 1024 need root); "
                               "pick a port from 1024 up") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise KatdataError(f"--host {host}: not an address of this machine") from None
        raise KatdataError(f"--port {port}: cannot bind it on {host} ({exc.strerror or exc})") from None


def check_log(path: Optional[str]) -> None:
    """Refuse a ``--log`` path that cannot take the log: a folder, a missing folder, not writable.
    (The server appends to the file: a file the user names is never replaced.)"""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise InputError(path, "a folder; --log takes a file (the server's log is appended to it)")
    if not target.parent.is_dir():
        raise InputError(path, f"no folder {target.parent} for the log (--log)")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise InputError(path, "not writable (--log)")


def check_adapter(adapter: str) -> None:
    """Refuse an ``--adapter`` that is missing or not a folder (adapter_config.json: servers.lora_args)."""
    folder = Path(adapter).expanduser()
    if not folder.exists():
        raise InputError(adapter, "no such adapter folder (--adapter)")
    if not folder.is_dir():
        raise InputError(adapter, "a file, not a peft adapter folder (--adapter)")


def check_model(ref: str, origin: str = "") -> None:
    """Refuse a model reference vLLM could not load, before vLLM starts.

    A local folder or GGUF file is fine. A missing path (``/x``, ``./x``, ``a/b/c``), or ``runs/nope``
    where ``runs/`` is a folder here, is a typo, not a Hub model id. Any other name must be a Hub model
    id that is in the Hub cache, or (online) that the Hub has; offline (HF_HUB_OFFLINE=1) or with the
    Hub unreachable an uncached id is refused. ``origin`` says where the reference came from."""
    where = f" ({origin})" if origin else ""
    path = Path(ref).expanduser()
    if path.is_dir():
        return
    if path.exists():
        if path.suffix == ".gguf":
            return
        raise InputError(ref, f"a file, not a model folder{where}")
    if missing_path(ref):
        raise InputError(ref, f"no such model folder{where}")
    head = ref.split("/")[0]
    if "/" in ref and Path(head).is_dir():
        raise InputError(ref, f"no such folder{where}; {head}/ is a folder here, so this is a path, not a Hub model id")
    problem = model_problem(ref, backend="vllm")  # the one rule for Hub ids (cache, offline, reachable)
    if problem:
        raise EngineError(f"{problem}{where}")


def failure_line(log_text: str) -> str:
    """The line of a vLLM server log that says why it failed, at most MAX_LINE characters.

    The last exception line (``OSError: ...``) that is not one of vLLM's "see root cause above"
    wrappers; else the last ERROR record's message; else the last line that is not a traceback frame."""
    lines = [PROC_PREFIX.sub("", ANSI.sub("", raw)).rstrip() for raw in log_text.splitlines()]
    lines = [line for line in lines if line.strip()]
    exceptions = [i for i, line in enumerate(lines) if EXCEPTION.match(line)]
    specific = [i for i in exceptions if not any(g in lines[i].lower() for g in GENERIC)]
    if specific or exceptions:
        i = (specific or exceptions)[-1]
        found = [lines[i]]
        for more in lines[i + 1:]:  # a pydantic ValidationError says what failed on its indented lines
            if not more[0].isspace() or more.lstrip().startswith("File "):
                break
            found.append(more.strip())
        found = " ".join(found)
    else:
        errors = [m.group(1) for m in map(ERROR_LOG.match, lines) if m]
        frames = ("Traceback", "During handling")
        plain = [line for line in lines if not line[0].isspace() and not line.startswith(frames)]
        found = (errors or plain or ["(the log is empty)"])[-1].strip()
    return found if len(found) <= MAX_LINE else found[:MAX_LINE - 3] + "..."


def lora_args(adapter: str, name: str) -> list[str]:
    """Server flags that serve a peft LoRA adapter folder un-merged under ``name``."""
    config = adapter_config(Path(adapter))
    if config.get("modules_to_save"):
        raise KatdataError(f"adapter {adapter}: it trains {config['modules_to_save']} (new marker tokens), which "
                           "vLLM cannot serve as a LoRA; train with train.merge: true and serve the run folder")
    rank = int(config.get("r") or 16)
    max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
    return ["--enable-lora", "--lora-modules", f"{name}={adapter}", "--max-lora-rank", str(max_rank)]


def adapter_config(folder: Path) -> dict:
    """A peft adapter folder's adapter_config.json, or a one-line error."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise KatdataError(f"adapter {folder}: no adapter_config.json (not a peft adapter folder)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KatdataError(f"adapter {path}: unreadable ({exc})") from None


def resolve_target(path: Optional[str], adapter: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(model, adapter) to serve for ``katdata serve PATH``.

    PATH may be a model folder or name, a run folder (its ``train/``) or a train output folder
    (``train.json``): a merged model there is served as is, otherwise its base model with its adapter.
    A peft adapter folder serves its base model with it.
    """
    if path is None or not Path(path).is_dir():
        return path, adapter
    folder = Path(path)
    if (folder / "config.json").is_file():
        return path, adapter
    train = next((d for d in (folder / "train", folder) if (d / "train.json").is_file() or (d / "adapter").is_dir()),
                 folder / "train" if (folder / "train").is_dir() else None)
    if train is not None:
        if adapter:
            raise KatdataError(f"{path} is a run folder, which names its own adapter; drop --adapter")
        stats: dict = {}
        if (train / "train.json").is_file():
            try:
                stats = json.loads((train / "train.json").read_text())
            except ValueError as exc:
                raise RunFolderError(f"{train / 'train.json'}: broken JSON ({exc})") from None
        merged = train / "merged"
        if (merged / "config.json").is_file():
            return str(merged), None
        if stats.get("merged"):
            raise RunFolderError(f"{train / 'train.json'} names a merged model, but {merged} holds none")
        if stats.get("marker_tokens"):
            raise KatdataError(f"{train}: the adapter adds marker tokens, so vLLM can only serve it merged; "
                               "train again with train.merge: true")
        if not (train / "adapter").is_dir():
            raise RunFolderError(f"{train}: no adapter/ and no merged/ model (did the train stage finish? "
                                 f"katdata train {path})")
        base = stats.get("base_model") or adapter_config(train / "adapter").get("base_model_name_or_path")
        return _base(base, train / "adapter"), str(train / "adapter")
    if (folder / "adapter_config.json").is_file():
        if adapter:
            raise KatdataError(f"{path} is an adapter folder; pass its base model as MODEL")
        return _base(adapter_config(folder).get("base_model_name_or_path"), folder), str(folder)
    if any((folder / name).exists() for name in RUN_FILES):
        raise RunFolderError(f"{path}: a run folder without train output (no train/); run the train stage first: "
                             f"katdata train {path}")
    raise KatdataError(f"{path}: not a model folder (no config.json), a run folder (no train/) or an adapter folder "
                       "(no adapter_config.json)")


def _base(base: Optional[str], adapter: Path) -> str:
    if not base:
        raise KatdataError(f"{adapter}: the adapter names no base model (base_model_name_or_path); "
                           f"pass it: katdata serve BASE --adapter {adapter}")
    return base

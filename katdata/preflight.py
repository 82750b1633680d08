"""Checks that need no model: a recipe's engine names, models, adapters, servers and run_dir; a run folder's inputs.

`katdata validate` and `katdata run` check a recipe with ``recipe_problems`` (through ``load_recipe``)
before any folder exists or any model loads; every stage command (`katdata STAGE RUN`, and calibrate)
checks its run folder with ``run_folder`` before it reads a recipe, imports torch or loads a model (eval
also its ``--model`` and ``--backend``) (eval checks its adapters
with ``check_adapters`` too, as the pipeline's eval stage does). So `validate` finds what `run` would find,
and a missing run folder is exit 3 (RunFolderError) in every command.

A model reference is a local folder (config.json, weights and tokenizer files), a GGUF file (vllm) or a
Hub id. A Hub id must be in the Hub cache when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set; otherwise
one request to the Hub (no retries, ``HUB_TIMEOUT_S``) says whether it is there, since transformers
retries an unreachable Hub for about a minute per file. huggingface_hub is imported only for a Hub id.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel

from katdata.errors import InputError, KatdataError, RunFolderError, one_line
from katdata.run_folder import FILES, RunFolder, read_json

log = logging.getLogger(__name__)

# what each command reads from a run folder: per requirement (any one of these paths, the stage that writes it)
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json",
             "*.tiktoken")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HUB_TIMEOUT_S = 5.0
HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")  # huggingface_hub's repo id rule (and no '--' or '..')
_hub_answers: dict[tuple, tuple[str, str]] = {}  # (endpoint, repo, revision) or (endpoint,) -> (status, why)


def needs(command: str) -> list[tuple[list[str], str]]:
    """What a command reads from a run folder (any one file of each list) and the stage that writes it: a
    stage command's declared reads (or, when it declares none, what it may read); calibrate reads votes."""
    from katdata.stages import all_stages, get

    if command == "calibrate":
        return [([FILES["votes"]], "vote")]
    producers = {name: s.name for s in all_stages() for name in s.files(s.writes)}
    stage = get(command)
    made_by = lambda name: producers.get(name) or producers[name.split("/")[0]]  # noqa: E731
    if stage.reads:
        return [([name], made_by(name)) for name in stage.files(stage.reads)]
    files = stage.files(stage.may_read)
    return [(files, made_by(files[-1]))]


def looks_local(ref: str) -> bool:
    """True for a model reference that can only be a local path (not a Hub id like ``org/name``)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") >= 2 or "\\" in ref


def missing_path(ref: Optional[str]) -> bool:
    """A local-looking path that does not exist (None, '' and 'embedded' are fine)."""
    return bool(ref) and ref != "embedded" and looks_local(ref) and not Path(ref).expanduser().exists()


# ---------------------------------------------------------------- models, adapters and the Hub
def _offline() -> Optional[str]:
    """The variable that puts huggingface_hub offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), if one does."""
    return next((k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


def hub_cache() -> Path:
    """The Hub cache folder as huggingface_hub finds it, read from the environment now (not at its import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _cached(repo: str, filename: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache(), revision=revision)
    return isinstance(found, str)


def _ask_hub(repo: str, revision: Optional[str]) -> tuple[str, str]:
    """('ok' | 'missing' | 'unreachable' | 'offline' | 'unknown', why): one request, no retries, HUB_TIMEOUT_S."""
    key = (hub_endpoint(), repo, revision)
    if key in _hub_answers:
        return _hub_answers[key]
    down = _hub_answers.get((hub_endpoint(),))
    if down:  # one timeout per endpoint, not one per model id
        return down
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        HfApi(endpoint=hub_endpoint()).model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
        answer = ("ok", "")
    except GatedRepoError:
        answer = ("ok", "")  # it exists; loading it needs HF_TOKEN with access, and transformers says so
    except RevisionNotFoundError:
        answer = ("missing", f"no revision '{revision}'")
    except RepositoryNotFoundError:
        answer = ("missing", "no such model (a private or gated one needs HF_TOKEN)")
    except OfflineModeIsEnabled:  # HF_HUB_OFFLINE was set when huggingface_hub was imported (in this process)
        answer = ("offline", "")
    except HfHubHTTPError as exc:  # it answered (rate limit, server error): let the loader try and say
        log.warning("the Hub at %s did not answer for %s (%s)", hub_endpoint(), repo, one_line(exc)[:200])
        answer = ("unknown", "")
    except Exception as exc:  # noqa: BLE001 - no network: DNS, refused, timeout, proxy (httpx or requests classes)
        answer = _hub_answers[(hub_endpoint(),)] = ("unreachable", f"{type(exc).__name__}: {one_line(exc)[:160]}")
    _hub_answers[key] = answer
    return answer


def hub_problem(repo: str, filename: str = "config.json", revision: Optional[str] = None) -> Optional[str]:
    """Why the Hub id ``repo`` cannot be loaded now (None: it can): not in the cache while offline, not on
    the Hub, or the Hub unreachable (then transformers would retry for minutes)."""
    offline = _offline()
    status, why = ("offline", "") if offline else _ask_hub(repo, revision)
    if status in ("ok", "unknown"):
        return None
    cached = _cached(repo, filename, revision)
    if status == "offline":
        setting = f"{offline}={os.environ[offline]}" if offline else "huggingface_hub's offline mode"
        return None if cached else (
            f"'{repo}' is no local folder and not in the Hub cache {hub_cache()}, and {setting} keeps the Hub off: "
            f"download it first (hf download {repo}, without {offline or 'HF_HUB_OFFLINE'}) or give a local model "
            "folder")
    fix = (f"download it first where the Hub can be reached (hf download {repo}), give a local model folder, or set "
           "HF_ENDPOINT to a mirror that answers")
    if status == "missing":
        return None if cached else f"'{repo}' is no local folder, and the Hub at {hub_endpoint()} has {why}"
    if cached:
        return (f"the Hub at {hub_endpoint()} cannot be reached ({why}), and loading '{repo}' would retry it for "
                "minutes: set HF_HUB_OFFLINE=1 to load its copy in the Hub cache")
    return (f"'{repo}' is no local folder and not in the Hub cache, and the Hub at {hub_endpoint()} cannot be "
            f"reached ({why}): {fix}")


def _has(folder: Path, patterns) -> bool:
    return any(next(folder.glob(p), None) is not None for p in patterns)


def model_problem(ref: Optional[str], backend: str = "transformers", revision: Optional[str] = None) -> Optional[str]:
    """Why ``ref`` (a recipe's model, a --model flag) is no model a backend can load; None when it is, or
    when it is the embedded model."""
    if not ref or ref == "embedded":
        return None
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" and backend == "vllm":
            return None
        return f"{ref} is a file, not a model folder" + (" (a GGUF file loads with backend vllm)"
                                                         if path.suffix == ".gguf" else "")
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return (f"{ref} is a LoRA adapter (adapter_config.json), not a model: give its base model here and "
                    "the adapter as lora_path")
        missing = [what for what, ok in (
            ("no config.json", (path / "config.json").is_file()),
            ("no weights (" + ", ".join(WEIGHTS) + ")", _has(path, WEIGHTS)),
            ("no tokenizer files (tokenizer.json, tokenizer.model, vocab.json...)", _has(path, TOKENIZER))) if not ok]
        return f"{ref} holds no loadable model: " + ", ".join(missing) if missing else None
    return _not_here(ref, "config.json", revision)


def adapter_problem(ref: Optional[str], revision: Optional[str] = None,
                    fix: str = "give the adapter folder `katdata train` wrote (RUN/train/adapter)") -> Optional[str]:
    """Why ``ref`` is no LoRA adapter peft can load (adapter_config.json and its weights); None when it is."""
    if not ref:
        return None
    path = Path(ref).expanduser()
    if path.is_file():
        return f"{ref} is a file, not a LoRA adapter folder; {fix}"
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            full = " (it holds config.json: a whole model, not an adapter)" if (path / "config.json").is_file() else ""
            return f"{ref} holds no LoRA adapter: no adapter_config.json{full}; {fix}"
        if not _has(path, ADAPTER_WEIGHTS):
            return f"{ref} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}), so it was not saved whole; {fix}"
        return None
    return _not_here(ref, "adapter_config.json", revision)


def _not_here(ref: str, filename: str, revision: Optional[str]) -> Optional[str]:
    """A reference that is no file or folder here: a missing path, or a Hub id that must be reachable."""
    if looks_local(ref):
        return f"no such file or folder: {ref}"
    head = ref.split("/")[0]
    if "/" in ref and Path(head).expanduser().is_dir():
        return f"no such file or folder: {ref} ({head}/ is a folder here, so this is a path, not a Hub id)"
    if not HUB_ID.match(ref) or "--" in ref or ".." in ref or not _valid_hub_id(ref):
        return f"no such file or folder, and not a Hub id either: {ref}"
    return hub_problem(ref, filename, revision)


def _valid_hub_id(ref: str) -> bool:
    """huggingface_hub's own rule (no leading or trailing '-' or '.'...), which its calls enforce by raising."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def policy_problem(ref: str) -> Optional[str]:
    """rl's SFT policy: a LoRA adapter (trained further) or a merged model folder."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return adapter_problem(ref)
    if path.is_dir() and (path / "config.json").is_file():
        return model_problem(ref)
    return (f"{ref} holds no SFT policy: no adapter_config.json (a LoRA adapter) and no config.json (a merged model); "
            "run `katdata train` first, or give the adapter `katdata train` wrote")


def check_backend(name: str, allowed: Optional[list[str]] = None) -> None:
    """Refuse a --backend that is not one of ``allowed`` (default: every engine) before anything loads."""
    from katdata.backends import BACKENDS

    allowed = allowed or sorted(BACKENDS)
    if name not in allowed:
        raise KatdataError(f"--backend {name}: no such backend here; valid: {', '.join(allowed)}")


# ---------------------------------------------------------------- recipes
def _engine_refs(cfg: BaseModel, prefix: str) -> Iterator[tuple[str, str]]:
    """(key path, engine name) of every field called ``engine`` or ``*_engine``, in nested sections too."""
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            yield from _engine_refs(value, f"{prefix}{name}.")
        elif (name == "engine" or name.endswith("_engine")) and isinstance(value, str):
            yield prefix + name, value


def _server_problem(base_url: Optional[str], recipe: bool = True) -> Optional[str]:
    """An openai engine's base_url (or OPENAI_BASE_URL): present, and every URL http(s)://."""
    urls = base_url or os.environ.get("OPENAI_BASE_URL") or ""
    if not urls.strip(", "):
        where = "set base_url (several, comma-separated) or OPENAI_BASE_URL" if recipe else "set OPENAI_BASE_URL"
        return f"the openai backend needs its server's URL: {where} (e.g. http://127.0.0.1:8000/v1)"
    bad = [u.strip() for u in urls.split(",") if u.strip() and not u.strip().startswith(("http://", "https://"))]
    where = "base_url" if base_url else "OPENAI_BASE_URL"
    return f"{where} {bad[0]!r} is no http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)" if bad else None


def recipe_problems(recipe) -> list[tuple[str, str]]:
    """(recipe key, problem) for everything checkable without loading a model or reading the data."""
    out: list[tuple[str, str]] = []
    try:
        recipe.run_dir.format(name=recipe.name)
    except KeyError as exc:
        out.append(("run_dir", f"unknown placeholder {{{exc.args[0]}}} in {recipe.run_dir!r}; the only one is {{name}}"))
    except (IndexError, ValueError) as exc:
        out.append(("run_dir", f"bad template {recipe.run_dir!r} ({exc}); the only placeholder is {{name}}"))
    engines = list(recipe.engines)
    for section in type(recipe).model_fields:
        cfg = getattr(recipe, section)
        if not isinstance(cfg, BaseModel):
            continue
        for key, name in _engine_refs(cfg, section + "."):
            if name not in recipe.engines:
                near = difflib.get_close_matches(name, engines, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                out.append((key, f"no engine named '{name}' under engines: (have {', '.join(engines)}){hint}"))

    def add(key: str, problem: Optional[str]) -> None:
        if problem:
            out.append((key, problem))

    for name, engine in recipe.engines.items():
        if engine.backend == "openai":  # model is the served model's name, not a folder
            add(f"engines.{name}.base_url", _server_problem(engine.base_url))
            for field in ("model", "lora_path"):
                if missing_path(getattr(engine, field)):
                    add(f"engines.{name}.{field}", f"no such file or folder: {getattr(engine, field)}")
            continue
        add(f"engines.{name}.model", model_problem(engine.model, engine.backend, engine.revision))
        add(f"engines.{name}.lora_path", adapter_problem(engine.lora_path))
    if recipe.train is not None:
        add("train.model", model_problem(recipe.train.model))
    if recipe.rl is not None:
        add("rl.model", model_problem(recipe.rl.model))
        if recipe.rl.policy and Path(recipe.rl.policy).expanduser().exists():
            add("rl.policy", policy_problem(recipe.rl.policy))
    # train.data, eval.adapter, eval.rl_adapter and rl.policy may be written by the run itself before they are
    # read: only one that exists now is checked
    for key in ("adapter", "rl_adapter"):
        ref = getattr(recipe.eval, key, None) if recipe.eval is not None else None
        if ref and Path(ref).expanduser().exists():
            add(f"eval.{key}", adapter_problem(ref))
    prev = Path(recipe.previous_round) if recipe.previous_round else None
    for name in (FILES["queries"], FILES["tags"]) if prev else ():
        if not (prev / name).is_file():
            out.append(("previous_round", f"{prev} has no {name}: run the previous round first"))
    if recipe.data is not None and recipe.data.path and not Path(recipe.data.path).exists():
        out.append(("data.path", f"input not found: {recipe.data.path}"))
    return out


# ---------------------------------------------------------------- run folders
def run_folder(path: Path, command: str, data: Optional[str] = None, backend: Optional[str] = None,
               models: Optional[dict[str, Optional[str]]] = None, **paths: Optional[str]) -> None:
    """Check a run folder, the stage inputs ``command`` reads from it, and its command line, before the
    command loads a model or changes anything. A missing folder, or one without an earlier stage's output,
    is a RunFolderError (exit 3) in every command.

    ``data`` replaces the run folder's own input (train's ``data`` setting); ``models`` maps a flag or key
    to a model reference (checked like a recipe's model, for ``backend``); ``paths`` are local paths that
    must exist.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: no such run folder (katdata {command} reads a folder made by `katdata run`)")
    if not path.is_dir():
        raise RunFolderError(f"{path}: not a folder (katdata {command} needs a run folder)")
    for key, value in paths.items():
        if missing_path(value):
            raise InputError(value, f"no such file or folder ({key.replace('_', '-')})")
    if backend is not None:
        check_backend(backend, ["transformers", "vllm"] if command == "eval" else None)
    if backend == "openai":  # --model is the served model's name; the server's URL comes from OPENAI_BASE_URL
        problem = _server_problem(None, recipe=False)
        if problem:
            raise KatdataError(f"--backend openai: {problem}")
    for key, ref in (models or {}).items() if backend != "openai" else ():
        problem = model_problem(ref, backend or "transformers")
        if problem:
            raise KatdataError(f"{key}: {problem}")
    if data and not Path(data).exists():
        raise InputError(data, "no such file or folder (data)")
    for files, stage in [] if data else needs(command):
        found = [f for f in files if (path / f).exists()]
        if not found:
            raise RunFolderError(f"{path}: {' or '.join(files)} not found: run the {stage} stage first "
                                 f"(katdata run RECIPE --until {stage})")
        wrong = [f for f in found if (path / f).is_dir() != ("." not in f)]  # run folders' folders have no suffix
        if len(wrong) == len(found):
            kind = "a file, not a folder" if "." not in wrong[0] else "a folder, not a file"
            raise RunFolderError(f"{path / wrong[0]}: {kind}; the {stage} stage writes it (katdata run RECIPE "
                                 f"--from {stage} makes it again)")
    if command in ("eval", "rl"):
        read_split(RunFolder(path).split)


def check_adapters(run_dir: Path, adapters: dict[str, Optional[str]]) -> None:
    """Each LoRA adapter folder a command will load (key -> path; None or 'none': not used): the run folder's
    own train/adapter missing or not whole is a RunFolderError (train again), one a setting names a KatdataError."""
    for key, ref in adapters.items():
        if not ref or ref == "none":
            continue
        inside = Path(ref).expanduser().resolve().is_relative_to(Path(run_dir).resolve())
        fix = (f"train again (move {Path(ref).parent} aside, then katdata train {run_dir})" if inside
               else f"set {key} to an adapter folder")
        problem = (adapter_problem(ref, fix=fix) if Path(ref).expanduser().exists()
                   else f"no such folder: {ref}; " + ("run `katdata train` first" if inside else fix))
        if problem:
            raise (RunFolderError if inside else KatdataError)(f"{key}: {problem}")


def read_split(path: Path) -> dict:
    """train/split.json as `katdata train` writes it ({data, train: [ids], heldout: [ids]}); an empty, cut
    short or foreign file is a RunFolderError naming it and how to make it again."""
    path = Path(path)
    fix = f"train again to rewrite it (move {path.parent} aside, then katdata train {path.parent.parent})"
    try:
        split = read_json(path, "the split `katdata train` wrote", fix)
    except FileNotFoundError:
        raise RunFolderError(f"{path}: not found; run `katdata train` first") from None
    ok = (isinstance(split, dict) and isinstance(split.get("data"), (str, type(None)))
          and all(isinstance(split.get(k), list) and all(isinstance(i, str) for i in split[k])
                  for k in ("train", "heldout")))
    if not ok:
        raise RunFolderError(f"{path}: not the split `katdata train` writes (a 'train' and a 'heldout' list of "
                             f"ids, a 'data' path); {fix}")
    return split


def train_record(run_dir: Path) -> dict:
    """train/train.json (what `katdata train` made: base_model, marker_tokens...), {} when there is none; a
    broken one is a RunFolderError naming it."""
    path = RunFolder(run_dir).train_record
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: not JSON ({exc}); train again to rewrite it (move {path.parent} "
                             "aside)") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: not the record `katdata train` writes (a JSON object with base_model)")
    return data

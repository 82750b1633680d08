"""Where a command may write: katdata replaces or writes into only a folder it made itself for that purpose.

The rule for every path the user gives (export's ``--out`` / ``export.out``; and the run folder's own train/, rl/ and eval/):

* a path that does not exist yet, or an empty folder: used;
* a folder katdata wrote for the same purpose: replaced (export) or written into (train, rl, eval). An export
  is recognised by its manifest ``.katdata-export.json`` (the run folder it came from, the format and every
  file it wrote), and replaced only while it holds nothing else; a train / rl / eval folder by its
  ``fingerprint.json`` naming that section's settings;
* anything else is refused with one line naming the path and why, before anything is touched: a file, a
  symbolic link, a folder katdata did not write, the run folder itself or a folder that contains it, a path
  inside another run folder, and inside the run folder any place other than the command's own (export: only
  ``RUN/export``; train / rl / eval: not inside another stage's folder).

Older run folders have no marker in ``RUN/export``: there a folder that looks like an export (README.md or
data/, nothing else unexpected) is accepted, and likewise ``train.json`` / ``rl.json`` / ``eval.json``
inside the run folder for the training and evaluation folders.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal, NoReturn, Optional

from katdata.errors import RunFolderError
from katdata.run_folder import FILES, RunFolder

log = logging.getLogger(__name__)

Kind = Literal["export", "train", "rl", "eval"]
MARKER = ".katdata-export.json"
# folders a run folder keeps (katdata.run_folder.FILES): no output of another command goes inside them
RUN_FOLDERS = tuple(name for name in FILES.values() if "/" not in name and "." not in name)
STAGE_FOLDERS = tuple(name for name in RUN_FOLDERS if name not in ("cache", "old"))  # the ones a stage writes
# what an export folder from before the marker holds (top level); README.md or data/ must be there
EXPORT_NAMES = {"README.md", "data", "dataset_info.json"}
# files that show an older katdata made a train / rl / eval folder (accepted inside the run folder only)
LEGACY = {"train": ("train.json", "split.json"), "rl": ("rl.json",), "eval": ("eval.json", "generations.jsonl")}
HINT = {"export": "choose a new or empty folder", "train": "move it out of the run folder",
        "rl": "move it out of the run folder", "eval": "move it out of the run folder"}
USES = {"export": "replaces only its own earlier exports"}  # train, rl, eval write into a folder: their wording
USE = "writes only into a new or empty folder or its own earlier {kind} folder"


def _real(path: Path) -> Path:
    """The absolute path with its parent's links resolved and the last part kept (it may itself be a link)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _run_folder_above(path: Path) -> Optional[Path]:
    """The nearest folder above ``path`` that holds summary.json (a run folder), if any."""
    for parent in path.parents:
        if (RunFolder(parent).summary).is_file():
            return parent
    return None


def check_replaceable(path: Path, *, run_dir: Path, kind: Kind, label: str = "output folder") -> str:
    """Raise RunFolderError (one line: ``LABEL PATH: why; nothing was written, remedy``) unless ``kind`` may
    write ``path`` for the run ``run_dir``; returns what is there now: "new", "empty" or "own" (katdata's own
    earlier output of that kind)."""
    given, where = Path(path), _real(path)
    run = Path(os.path.abspath(run_dir)).resolve()

    def refuse(why: str, remedy: str = HINT[kind]) -> NoReturn:
        raise RunFolderError(f"{label} {given}: {why}; nothing was written, {remedy}")

    if where.is_symlink():
        refuse(f"a symbolic link (to {os.readlink(where)}), and katdata does not write through links")
    if where == run:
        refuse(f"the run folder itself, and {kind} writes a folder of its own (default {Path(run_dir) / kind})")
    if _inside(run, where):
        refuse(f"contains the run folder {run_dir}, which {kind} would write over")
    other = _run_folder_above(where)
    if other is not None and other != run and not _inside(run, other):
        refuse(f"inside the run folder {other} of another run")
    if _inside(where, run):
        rel = where.relative_to(run)
        if kind == "export" and rel != Path("export"):
            refuse(f"inside the run folder {run_dir}, where export writes only {Path(run_dir) / 'export'}",
                   "choose that or a folder outside the run")
        top = rel.parts[0]
        if kind != "export" and top in RUN_FOLDERS and (len(rel.parts) > 1 or top != kind):
            owner = f"the {top} stage" if top in STAGE_FOLDERS else "the run"
            refuse(f"{'inside' if len(rel.parts) > 1 else 'is'} {Path(run_dir) / top}, the run folder's own {top}/ "
                   f"folder, which katdata writes for {owner}")
    for parent in where.parents:  # the first existing folder above must be a folder
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                refuse(f"{parent} is a file, not a folder", "choose another path")
            break
    if not where.exists() and not where.is_symlink():
        return "new"
    use = USES.get(kind, USE.format(kind=kind))
    if not where.is_dir():
        refuse(f"{'a file' if where.is_file() else 'not a folder'}, and {kind} {use}")
    try:
        entries = sorted(p.name for p in where.iterdir())
    except OSError as exc:
        refuse(f"cannot be read ({exc.strerror or exc})")
    if not entries:
        return "empty"
    if "summary.json" in entries:
        refuse(f"a run folder (it holds summary.json), and {kind} {use}")
    why = _export_own(where, run, entries) if kind == "export" else _stage_own(where, run, kind, entries)
    if not why:
        log.debug("%s %s: katdata's own earlier %s output", label, given, kind)
        return "own"
    refuse(f"{why}, and {kind} {use}" if why.startswith("a folder katdata") else why,
           "move it out first or " + HINT[kind] if why.startswith("holds") else HINT[kind])


def _export_own(where: Path, run: Path, entries: list[str]) -> Optional[str]:
    """None when ``where`` is an earlier export that holds only what export wrote; else why not."""
    if MARKER not in entries:
        if where == run / "export" and (("README.md" in entries) or ("data" in entries)):
            strangers = [e for e in entries if e not in EXPORT_NAMES and not e.endswith(".png")]
            return _strangers(strangers) if strangers else None  # None: an export made before the marker existed
        return f"a folder katdata did not write (not empty, no {MARKER} in it)"
    try:
        manifest = json.loads((where / MARKER).read_text("utf-8"))
        listed = set(manifest["files"]) if manifest.get("kind") == "export" else None
    except (OSError, UnicodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its {MARKER} is not a katdata export manifest ({type(exc).__name__})"
    if listed is None:
        return f"its {MARKER} is not a katdata export manifest"
    came_from = Path(str(manifest.get("run_dir") or run))
    if came_from != run and where == came_from / "export":
        return f"the export of another run folder ({came_from})"
    folders = {p for f in listed for p in _ancestors(f)}
    strangers = []
    for dirpath, dirnames, filenames in os.walk(where):
        base = Path(dirpath).relative_to(where)
        for name in dirnames + filenames:
            rel = (base / name).as_posix()
            if rel != MARKER and rel not in listed and rel not in folders:
                strangers.append(rel)
    return _strangers(sorted(strangers)) if strangers else None


def _strangers(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return (f"holds {', '.join(names[:3])}{more}, which export did not write and replacing the folder would "
            "delete")


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _stage_own(where: Path, run: Path, kind: str, entries: list[str]) -> Optional[str]:
    """None when ``where`` is a folder that ``kind`` wrote before (its fingerprint.json names kind's settings)."""
    if "fingerprint.json" in entries:
        try:
            settings = json.loads((where / "fingerprint.json").read_text("utf-8")).get("settings") or {}
            if any(str(k).startswith(f"{kind}.") for k in settings):
                return None
        except (OSError, UnicodeError, ValueError, AttributeError):
            pass
        return f"its fingerprint.json was not written by katdata {kind}"
    if ".fingerprint.json.tmp" in entries:  # another process of a distributed launch is writing it right now
        return None
    if _inside(where, run) and any(name in entries for name in LEGACY[kind]):
        return None  # made by a katdata from before fingerprints
    return f"a folder katdata did not write (not empty, no {kind} fingerprint.json in it)"


def write_marker(folder: Path, *, kind: Kind, run_dir: Path, **info) -> Path:
    """Write the manifest of an export folder: the kind, the run folder, ``info`` and every file in it."""
    from katdata import __version__

    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    doc = {"kind": kind, "katdata": __version__, "run_dir": str(Path(os.path.abspath(run_dir)).resolve()),
           **info, "files": files}
    path = folder / MARKER
    path.write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
    return path


def umask() -> int:
    """The process's umask (read from /proc where it can be, else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain mkdir / open would have given (tempfile.mkdtemp
    makes its folder 0700 whatever the umask)."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for names, mode in ((dirnames, 0o777), (filenames, 0o666)):
            for name in names:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):  # chmod would change the link's target
                    os.chmod(path, mode & ~mask)

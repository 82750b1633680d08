"""The run folder: its files by name, summary.json, and the checks made before a run changes anything.

``summary.json`` holds per stage its statistics and ``done``, and under ``fingerprints`` what made each
stage's output (settings, input hashes) and the hashes of the files it wrote, so a file removed or
edited by hand since its stage wrote it is named before a later stage reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from katdata.errors import RunFolderError
from katdata.fingerprint import hash_path

# every file and folder of a run, by key; nothing outside this module writes a run-file name
FILES = {
    "summary": "summary.json", "recipe": "recipe.yaml", "cache": "cache", "old": "old",
    "loaded": "loaded.jsonl", "queries": "queries.jsonl", "contaminated": "contaminated.jsonl",
    "tags": "tags.jsonl", "solve": "solve.jsonl", "samples": "samples.jsonl",
    "votes": "votes.jsonl", "calibration": "calibration.json", "calibration_plot": "calibration_reliability.png",
    "judges": "judges.jsonl", "records": "records.jsonl", "rejects": "rejects.jsonl",
    "review": "review", "merged": "review/merged.jsonl", "export": "export",
    "train": "train", "split": "train/split.json", "train_record": "train/train.json", "adapter": "train/adapter", "merged_model": "train/merged",
    "rl": "rl", "rl_adapter": "rl/adapter", "eval": "eval",
}


class RunFolder:
    """A run folder's paths by name: ``RunFolder(root).tags`` is ROOT/tags.jsonl (keys: ``FILES``)."""

    def __init__(self, root):
        self.root = Path(root)

    def __getattr__(self, key: str) -> Path:
        if key.startswith("_") or key not in FILES:
            raise AttributeError(f"no run file called '{key}' (katdata.run_folder.FILES)")
        return self.root / FILES[key]

    def path(self, key: str) -> Path:
        return getattr(self, key)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"


def saved_recipe(run_dir) -> Optional[Path]:
    """RUN_DIR/recipe.yaml, the recipe the run was made with (None when the folder has none): what a command on
    a run folder reads its settings from when it is not given a recipe."""
    path = RunFolder(run_dir).recipe
    return path if path.is_file() else None


def read_json(path: Path, what: str, fix: str):
    """A JSON run file katdata wrote (``what`` names it in errors): a folder in its place, text that is not
    UTF-8, an empty file or broken JSON is a RunFolderError naming the file (and line) and ``fix``. A
    missing file raises FileNotFoundError, for the caller to word."""
    try:
        text = Path(path).read_text("utf-8")
    except IsADirectoryError:
        raise RunFolderError(f"{path}: a folder, not {what}; {fix}") from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not UTF-8 text, so not {what}; {fix}") from None
    if not text.strip():
        raise RunFolderError(f"{path}: empty (broken JSON, cut short?); {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}:{exc.lineno}: broken JSON ({exc.msg}; cut short?); {fix}") from None


def _read_summary(path: Path) -> dict:
    """summary.json as katdata wrote it; a broken or foreign file is a RunFolderError naming it."""
    fix = "move it aside to resume, or give a new folder with --run-dir"
    data = read_json(path, "katdata's summary", fix)
    ok = (isinstance(data, dict) and isinstance(data.get("stages"), dict)
          and all(isinstance(v, dict) for v in data["stages"].values())
          and isinstance(data.get("fingerprints", {}), dict))
    if not ok:
        raise RunFolderError(f"{path}: not a katdata summary (no 'stages' mapping of stage entries); {fix}")
    return data


class Summary:
    """summary.json: per stage its statistics and ``done``; ``fingerprints``: what made each stage's output.

    A stage's entry is written with ``done: false`` when it starts and ``done: true`` only when it
    returned normally (its rows are complete); a finished stage is skipped on resume.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data = _read_summary(path) if path.exists() else {"stages": {}}
        self.data.setdefault("fingerprints", {})

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("done", False)

    def begin(self, stage: str, forget: list[str], fp: dict) -> None:
        """Forget the stages being recomputed, mark ``stage`` started with its fingerprint, save."""
        for s in forget:
            self.data["stages"].pop(s, None)
            self.data["fingerprints"].pop(s, None)
        prev = self.data["stages"].get(stage, {})
        self.data["stages"][stage] = {"done": False, "seconds": prev.get("seconds", 0.0)}
        self.data["fingerprints"][stage] = fp
        self._save()

    def record(self, stage: str, stats: dict, seconds: float, files: list[str] = ()) -> None:
        """``stage`` finished: its statistics, and the hashes of its run ``files`` (those that are files)."""
        prev = self.data["stages"].get(stage, {})
        stats = dict(stats, done=True, seconds=round(prev.get("seconds", 0.0) + seconds, 2))
        self.data["stages"][stage] = stats
        run_dir = self.path.parent
        written = {name: hash_path(run_dir / name) for name in files if not (run_dir / name).is_dir()}
        if stage in self.data["fingerprints"] and written:
            self.data["fingerprints"][stage]["outputs"] = written
        self._save()

    def written(self, stage: str, name: str) -> Optional[str]:
        """The hash ``stage`` recorded for its file ``name`` when it finished (None: not recorded)."""
        return self.data["fingerprints"].get(stage, {}).get("outputs", {}).get(name)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str), "utf-8")
        os.replace(tmp, self.path)


def check_inputs(summary: Summary, run_dir: Path, stage: str, paths: list[Path], running: set[str],
                 producers: dict[str, str], required: list[str], memo: Optional[dict] = None) -> None:
    """Before anything changes: every run file ``stage`` reads was made by its stage (``producers``: file name
    -> stage), or is made by one of the ``running`` stages before it, and is as that stage wrote it, not
    removed or edited by hand since; a ``required`` file that was never made stops the run. ``memo``: file
    hashes already computed (katdata.fingerprint.hash_inputs' memo)."""
    memo = {} if memo is None else memo
    for path in paths:
        try:
            name = Path(path).relative_to(run_dir).as_posix()
        except ValueError:
            continue  # outside the run folder: the fingerprint's input hash covers it
        made_by = producers.get(name) or producers.get(name.split("/")[0])
        if made_by is None or made_by in running or made_by == stage:
            continue
        if not summary.done(made_by):
            if not Path(path).exists() and name in required:
                raise RunFolderError(f"{run_dir}: {stage} reads {name}, which the {made_by} stage has not made; "
                                     f"run from that stage (--from {made_by}, or without --from)")
            continue
        recorded = summary.written(made_by, name)
        if recorded in (None, "missing"):
            continue  # a folder, a file the stage did not write, or recorded by an older katdata
        key = str(Path(path).resolve())
        now = memo[key] if key in memo else memo.setdefault(key, hash_path(path))
        if now != recorded:
            how = "removed" if now == "missing" else "changed"
            raise RunFolderError(f"{path}: {how} since the {made_by} stage wrote it, and {stage} reads it; "
                                 f"rerun with --from {made_by} to make it again, or use a new folder (--run-dir)")


def holds_model_output(run_dir: Path, model_files: list[str]) -> bool:
    """True when anything in the folder came from a model: cached completions, or one of ``model_files``."""
    cache = run_dir / "cache"
    if cache.is_dir() and any(p.is_file() and p.stat().st_size for p in cache.rglob("*")):
        return True
    for name in model_files:
        path = run_dir / name
        if path.is_file() and path.stat().st_size or path.is_dir() and any(path.iterdir()):
            return True
    return False

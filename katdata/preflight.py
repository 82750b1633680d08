"""Checks that need no model: a recipe's engine names, local paths and run_dir; a run folder's inputs.

`katdata validate` and `katdata run` check a recipe with ``recipe_problems`` (through ``load_recipe``)
before any folder exists or any model loads; `katdata train / eval / export / review` check their
run folder with ``run_folder`` before importing torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel

from katdata.errors import InputError, RunFolderError

# what each command reads from a run folder (any one of them), and the stage that writes it
NEEDS = {
    "export": (["review/merged.jsonl", "records.jsonl"], "assemble"),
    "review": (["records.jsonl"], "assemble"),
    "train": (["export", "records.jsonl"], "assemble"),
    "eval": (["train/split.json"], "train"),
}


def looks_local(ref: str) -> bool:
    """True for a model reference that can only be a local path (not a Hub id like ``org/name``)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") >= 2 or "\\" in ref


def missing_path(ref: Optional[str]) -> bool:
    """A local-looking path that does not exist (None, '' and 'embedded' are fine)."""
    return bool(ref) and ref != "embedded" and looks_local(ref) and not Path(ref).expanduser().exists()


def _engine_refs(cfg: BaseModel, prefix: str) -> Iterator[tuple[str, str]]:
    """(key path, engine name) of every field called ``engine`` or ``*_engine``, in nested sections too."""
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            yield from _engine_refs(value, f"{prefix}{name}.")
        elif (name == "engine" or name.endswith("_engine")) and isinstance(value, str):
            yield prefix + name, value


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
    for name, engine in recipe.engines.items():
        for field in ("model", "lora_path"):
            if missing_path(getattr(engine, field)):
                out.append((f"engines.{name}.{field}", f"no such file or folder: {getattr(engine, field)}"))
    # (train.data and eval.adapter are not checked: the run itself may write them before they are read)
    if recipe.train is not None and missing_path(recipe.train.model):
        out.append(("train.model", f"no such file or folder: {recipe.train.model}"))
    prev = Path(recipe.previous_round) if recipe.previous_round else None
    for name in ("queries.jsonl", "tags.jsonl") if prev else ():
        if not (prev / name).is_file():
            out.append(("previous_round", f"{prev} has no {name}: run the previous round first"))
    if recipe.data is not None and recipe.data.path and not Path(recipe.data.path).exists():
        out.append(("data.path", f"input not found: {recipe.data.path}"))
    return out


def run_folder(path: Path, command: str, data: Optional[str] = None, **paths: Optional[str]) -> None:
    """Check a run folder (and any local paths given by keyword) before a command loads anything.

    ``data`` replaces the run folder's own input (train's ``data`` setting).
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: no such run folder (katdata {command} reads a folder made by `katdata run`)")
    if not path.is_dir():
        raise RunFolderError(f"{path}: not a folder (katdata {command} needs a run folder)")
    for key, value in paths.items():
        if missing_path(value):
            raise InputError(value, f"no such file or folder ({key.replace('_', '-')})")
    if data:
        if not Path(data).exists():
            raise InputError(data, "no such file or folder (data)")
        return
    files, stage = NEEDS[command]
    if not any((path / f).exists() for f in files):
        raise RunFolderError(f"{path}: no {' or '.join(files)} in the run folder; run the {stage} stage first "
                             f"(katdata run RECIPE --until {stage})")

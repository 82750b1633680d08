"""The recipes shipped inside the package (``katdata/recipes/``): list them, find one by name, copy one out.

``katdata run NAME`` / ``katdata validate NAME`` run a packaged recipe when NAME is not an existing file;
``katdata ls`` lists them; ``katdata cp NAME [DEST]`` copies one to edit and never overwrites a file.
Relative paths inside a recipe (``run_dir``, ``previous_round``, ``lora_path``) are relative to the working
directory, so a packaged recipe runs the same from any folder as a copy of it does.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Optional

from katdata.errors import InputError

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SUFFIXES = (".yaml", ".yml")


def packaged(everything: bool = False) -> dict[str, Path]:
    """{name: file} of the packaged recipes, sorted by name; ``everything`` adds the other packaged
    files (``accelerate/multi_gpu``: configs for other tools, not recipes), named by their relative path."""
    if not RECIPES_DIR.is_dir():
        return {}
    files = RECIPES_DIR.rglob("*.yaml") if everything else RECIPES_DIR.glob("*.yaml")
    return {p.relative_to(RECIPES_DIR).with_suffix("").as_posix(): p for p in sorted(files) if p.is_file()}


def description(path: Path) -> str:
    """The first comment line of a recipe file, without its '#' (what `katdata ls` prints beside it)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        return f"(unreadable: {'a symlink loop' if exc.errno == 40 else exc.strerror})"
    except UnicodeDecodeError:
        return "(not UTF-8 text)"
    return next((line.lstrip("#").strip() for line in lines if line.startswith("#")), "")


def _name(given: str) -> str:
    return next((given[: -len(s)] for s in SUFFIXES if given.endswith(s)), given)


def _unknown(given: str, names: list[str], what: str) -> InputError:
    key = _name(given)
    near = difflib.get_close_matches(Path(key).name, names, n=1) or difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return InputError(given, f"{what} (packaged recipes: {', '.join(names) or 'none'}){hint}")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The recipe file to load: ``name_or_path`` itself when it exists (a folder or a bad file too: the
    loader says what is wrong with it), else the packaged recipe of that name (``quickstart`` or
    ``quickstart.yaml``). Neither: an InputError listing the packaged names, with the closest one."""
    given = Path(name_or_path)
    if given.exists() or given.is_symlink():
        return given
    recipes = packaged()
    key = _name(str(name_or_path))
    if key not in recipes:
        raise _unknown(str(name_or_path), list(recipes), "recipe not found: no such file and no packaged recipe of that name")
    local = Path(key + ".yaml")
    if local.is_file() and local.read_bytes() != recipes[key].read_bytes():
        log.warning("running the packaged recipe '%s'; the edited %s here runs with: katdata run %s", key, local, local)
    return recipes[key]


def is_recipe(name: str) -> bool:
    """Whether ``name`` is a packaged recipe (``katdata run NAME``), not one of the other packaged files."""
    return _name(name) in packaged()


def command_arg(path: Path) -> str:
    """How to name ``path`` on a `katdata run` line: its name when it is a packaged recipe, else the path."""
    path = Path(path)
    if path.parent.resolve() == RECIPES_DIR and path.suffix == ".yaml":
        return path.stem
    return str(path)


def copy(name: str, dest: Optional[str] = None) -> Path:
    """Copy the packaged file ``name`` to ``dest`` (a file, or a folder to hold NAME.yaml; default
    ./NAME.yaml) byte for byte. An existing file is never overwritten: that is an InputError naming it."""
    files = packaged(everything=True)
    key = _name(name)
    if key not in files:
        raise _unknown(name, list(files), "no packaged recipe of that name")
    source = files[key]
    target = Path(dest) if dest else Path(source.name)
    if dest and (target.is_dir() or dest.endswith(("/", os.sep))):
        target = target / source.name
    if os.path.lexists(target):
        raise InputError(target, "already exists; katdata cp never overwrites a file: remove it or name another DEST")
    folder = target.parent
    if not folder.is_dir():
        raise InputError(folder, "not a folder" if folder.exists() else "no such folder (make it first)")
    try:
        with open(target, "xb") as out:  # exclusive: a file made meanwhile is not overwritten either
            out.write(source.read_bytes())
    except FileExistsError:
        raise InputError(target, "already exists; katdata cp never overwrites a file") from None
    log.debug("copied %s to %s", source, target)
    return target

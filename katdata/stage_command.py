"""`katdata STAGE RUN_DIR`: one stage of a run folder, through the same checks as `katdata run`.

The command line is made from the stage's declaration (katdata.stage): its help, and one flag per
scalar setting of its recipe section (``--n 4`` is ``--set sample.n=4``; booleans as ``--use-llm`` /
``--no-use-llm``), the way TRL's argument parser turns a config class into flags. Common to every
stage command:

    RUN_DIR            the run folder
    --config RECIPE    the recipe (default: RUN_DIR/recipe.yaml, the one the run was made with), or a file of
                       the stage's settings alone (they replace its section of RUN_DIR/recipe.yaml)
    --set KEY=VALUE    a setting of the stage's section (``n=4``) or any recipe key (``engines.default.model=...``)
    --redo             recompute the stage (its outputs and the later stages' move to RUN_DIR/old/)

The stage then runs as ``katdata run RECIPE --run-dir RUN_DIR --from STAGE --until STAGE`` would, but
resuming rather than recomputing: the recipe is checked, the stage's inputs must be there as their
stages wrote them, and a stage started or finished with other settings is refused (``--redo``
recomputes it) - a stage command never mixes two configurations in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from katdata.errors import InputError
from katdata.run_folder import RunFolder
from katdata.stage import Stage

_SCALARS = (int, float, str, bool, Path)


def _scalar(annotation: Any) -> Optional[tuple]:
    """(type, choices) of a setting that one flag can carry, else None (lists, tables, nested models)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return str, tuple(str(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        return _scalar(inner[0]) if len(inner) == 1 else None
    if annotation in _SCALARS:
        return annotation, None
    return None


def flag_settings(stage: Stage) -> dict[str, tuple[type, Optional[tuple], str]]:
    """Setting name -> (type, choices, help) for each setting of the stage's section a flag can carry."""
    out = {}
    for name, field in (stage.config.model_fields.items() if stage.config else ()):
        kind = _scalar(field.annotation)
        if kind is not None:
            default = field.default if not callable(field.default_factory) else None
            out[name] = (*kind, f"{field.description or ''} (default: {default})".strip())
    return out


def build_parser(stage: Stage, extra: Optional[typing.Callable[[argparse.ArgumentParser], None]] = None):
    p = argparse.ArgumentParser(prog=f"katdata {stage.name}", description=f"{stage.help}. Runs the `{stage.name}` "
                                "stage of a run folder with the checks of `katdata run` (a stage made with other "
                                "settings is refused; --redo recomputes it).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder")
    p.add_argument("--config", metavar="RECIPE", help="the recipe (default: RUN_DIR/recipe.yaml), or a YAML file of "
                   f"the `{stage.name}:` settings alone")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting: a key of the `{stage.name}:` section, or a full recipe key path")
    p.add_argument("--redo", action="store_true",
                   help="recompute the stage: its outputs and the later stages' move to RUN_DIR/old/")
    group = p.add_argument_group(f"settings of the recipe's `{stage.name}:` section")
    for name, (kind, choices, help_text) in flag_settings(stage).items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f"setting_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f"setting_{name}", default=None, choices=choices,
                               type=str, metavar=None if choices else kind.__name__.upper(), help=help_text)
    if extra:
        extra(p)
    return p


def overrides(stage: Stage, args: argparse.Namespace) -> list[str]:
    """The ``--set`` items the command line asks for: the generated flags first, then ``--set`` (last wins)."""
    return [item for item, _ in _given(stage, args)]


def _given(stage: Stage, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(``--set`` item, how the user wrote it) per setting on the command line."""
    from katdata.recipe import Recipe

    fields = stage.config.model_fields if stage.config else {}
    given = []
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            name = key.removeprefix("setting_")
            value = str(value).lower() if isinstance(value, bool) else value
            given.append((f"{stage.name}.{name}={value}", f"--{name.replace('_', '-')} {value}"))
    for item in args.set:  # a key of the section, else of the recipe; neither: the section's (its error names it)
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        inside = head in fields or head not in Recipe.model_fields
        given.append((f"{stage.name}.{item}" if inside else item, f"--set '{item}'"))
    return given


def recipe_path(run_dir: Path, config: Optional[str]) -> Path:
    if config:
        from katdata import recipe_registry

        return Path(recipe_registry.resolve(config))
    path = RunFolder(run_dir).recipe
    if not path.is_file():
        raise InputError(path, "not found: give the recipe with --config RECIPE")
    return path


def _settings_file(stage: Stage, config: Optional[str]) -> Optional[dict]:
    """The settings of a ``--config`` file that holds the stage's section alone (not a whole recipe), else None."""
    if not config or not Path(config).is_file():
        return None
    from katdata.recipe import Recipe
    from katdata.settings import read_yaml

    doc = read_yaml(config, "config")
    recipe_only = set(Recipe.model_fields) - set(stage.config.model_fields)
    whole = stage.name in doc or any(key in recipe_only for key in doc)  # `name: r` alone is a recipe too
    return None if whole else doc


def section(stage: Stage, args: argparse.Namespace):
    """The stage's section from the command line alone (a ``--config`` file of its settings, its flags and ``--set``
    on the defaults), for a folder without a recipe; a bad value is one line naming the flag."""
    from pydantic import ValidationError, create_model

    from katdata.settings import explain, parse_override, set_key

    settings_file = _settings_file(stage, args.config)
    data: dict = {stage.name: dict(settings_file or {})}
    origin = {}  # section key -> the flag or --set that gave it
    for item, shown in _given(stage, args):
        key, value = parse_override(item)
        set_key(data, key, value, item)
        origin[key] = shown

    def blame(loc: tuple) -> str:
        dotted = ".".join(str(p) for p in loc)
        return next((shown for key, shown in reversed(origin.items()) if dotted == key or dotted.startswith(key + ".")),
                    args.config if settings_file is not None else "default")

    holder = create_model("Recipe", **{stage.name: (stage.config, ...)})  # errors name the key as a recipe key
    try:
        return getattr(holder.model_validate({stage.name: data.get(stage.name) or {}}), stage.name)
    except ValidationError as exc:
        raise explain(exc, blame, holder) from None


def load(stage: Stage, args: argparse.Namespace, more: list[str] = ()):
    """The recipe a stage command runs with: ``--config`` (a whole recipe), else the run's recipe.yaml with the
    stage's section from ``--config`` when that file holds the section alone; then the flags and ``--set``. An
    optional stage the recipe leaves out (train, rl, eval after `katdata run`) runs with its defaults."""
    from katdata.recipe import load_recipe

    alone = _settings_file(stage, args.config)
    path = recipe_path(args.run_dir, None if alone is not None else args.config)
    sets = [*more, *overrides(stage, args)]
    if alone is not None:
        sets = [f"{stage.name}={json.dumps(alone, default=str)}", *sets]
    recipe = load_recipe(path, sets)
    if stage.optional and getattr(recipe, stage.name, None) is None:
        recipe = load_recipe(path, [f"{stage.name}={{}}", *sets])
    return recipe


def main_rank() -> bool:
    """True outside distributed launches and on rank 0 of one (torchrun / accelerate launch set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def _rank_sync():
    """Under a launch of several processes: a barrier, so that rank 0 prepares the run folder before the other
    ranks start the stage (they run the stage's body only; rank 0 checks, records and writes). None otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState().wait_for_everyone


def main(name: str, argv: list[str], extra=None, after=None, bare=None, sets=None, show=None) -> int:
    """Run stage ``name`` on a run folder. ``extra(parser)`` adds a stage's own options and ``sets(args)`` the recipe
    keys they set (``--set`` items); ``after(args, recipe, run_dir)`` may act instead of running the stage
    (returning an exit code) or return None to run it; ``bare(args)`` acts on a folder with no recipe.yaml when no
    whole recipe is given (else that is refused); ``show(stats, run_dir)`` prints the stage's statistics (default:
    as JSON)."""
    from katdata import pipeline, stages

    stage = stages.get(name)
    args = build_parser(stage, extra).parse_args(argv)
    from katdata.preflight import run_folder

    if stage.config:
        section(stage, args)  # a bad flag or --set is named first, whatever the folder holds
    run_folder(args.run_dir, name)  # the folder and the run files the stage reads, before the recipe or a model
    whole = args.config and _settings_file(stage, args.config) is None
    if bare is not None and not whole and not RunFolder(args.run_dir).recipe.is_file():
        return bare(args)
    recipe = load(stage, args, sets(args) if sets else [])
    if after is not None:
        code = after(args, recipe, args.run_dir)
        if code is not None:
            return code
    data = pipeline.run(recipe, args.run_dir, name, name, recompute=args.redo,
                        worker=not main_rank(), sync=_rank_sync())
    if main_rank():
        stats = data["stages"].get(name, {})
        show(stats, args.run_dir) if show else print(json.dumps(stats, indent=1, default=str))
    return 0

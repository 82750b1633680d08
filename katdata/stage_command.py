"""`katdata STAGE RUN_DIR`: one stage of a run folder, through the same checks as `katdata run`.

The command line is made from the stage's declaration (katdata.stage): its help, and one flag per
scalar setting of its recipe section (``--n 4`` is ``--set sample.n=4``; booleans as ``--use-llm`` /
``--no-use-llm``), the way TRL's argument parser turns a config class into flags. Common to every
stage command:

    RUN_DIR            the run folder
    --config RECIPE    the recipe (default: RUN_DIR/recipe.yaml, the one the run was made with)
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
    p.add_argument("--config", metavar="RECIPE", help="the recipe (default: RUN_DIR/recipe.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
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
    fields = stage.config.model_fields if stage.config else {}
    sets = []
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            value = str(value).lower() if isinstance(value, bool) else value
            sets.append(f"{stage.name}.{key.removeprefix('setting_')}={value}")
    for item in args.set:
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        sets.append(f"{stage.name}.{item}" if head in fields else item)
    return sets


def recipe_path(run_dir: Path, config: Optional[str]) -> Path:
    if config:
        from katdata import recipe_registry

        return Path(recipe_registry.resolve(config))
    path = RunFolder(run_dir).recipe
    if not path.is_file():
        raise InputError(path, "not found: give the recipe with --config RECIPE")
    return path


def section(stage: Stage, args: argparse.Namespace):
    """The stage's section from the command line alone (its flags and ``--set`` on the defaults), for a folder
    without a recipe; a bad value is one line naming the flag."""
    from pydantic import ValidationError

    from katdata.settings import explain, parse_override, set_key

    data: dict = {}
    for item in overrides(stage, args):
        key, value = parse_override(item)
        set_key(data, key, value, item)
    try:
        return stage.config.model_validate(data.get(stage.name) or {})
    except ValidationError as exc:
        raise explain(exc, None, stage.config, style="option") from None


def main(name: str, argv: list[str], extra=None, after=None, bare=None) -> int:
    """Run stage ``name`` on a run folder. ``extra(parser)`` adds a stage's own options; ``after(args, recipe,
    run_dir)`` may act instead of running the stage (returning an exit code) or return None to run it;
    ``bare(args)`` acts on a folder with no recipe.yaml when no --config is given (else that is refused)."""
    from katdata import pipeline, stages
    from katdata.recipe import load_recipe

    stage = stages.get(name)
    args = build_parser(stage, extra).parse_args(argv)
    from katdata.preflight import run_folder

    run_folder(args.run_dir, name)  # the folder and the run files the stage reads, before the recipe or a model
    if bare is not None and not args.config and not RunFolder(args.run_dir).recipe.is_file():
        return bare(args)
    recipe = load_recipe(recipe_path(args.run_dir, args.config), overrides(stage, args))
    if after is not None:
        code = after(args, recipe, args.run_dir)
        if code is not None:
            return code
    data = pipeline.run(recipe, args.run_dir, name, name, recompute=args.redo)
    print(json.dumps(data["stages"].get(name, {}), indent=1, default=str))
    return 0

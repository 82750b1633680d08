"""The `katdata` command: `main(argv) -> int`, subcommands dispatched lazily.

`katdata --help` imports nothing heavy; each command imports its stage module when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from katdata import __version__
from katdata.errors import EXIT_CHECK_FAILED, EXIT_CODES_HELP, InputError, KatdataError, RunFolderError, report
from katdata.stages import STAGE_MODULES, all_stages

# commands handed to another module: every stage (its help from its declaration, katdata.stages; its
# module's own `main(argv) -> int` where it has one, else the command katdata.stage_command makes from the
# declaration), and two commands that are not stages
DELEGATED = {
    **{s.name: (module, s.help) for module, s in zip(STAGE_MODULES, all_stages())},
    "calibrate": ("katdata.calibrate", "fit the tagger's p(needs reasoning) to a run's vote outcomes"),
    "serve": ("katdata.servers", "serve a model, adapter or run folder with vLLM (KAT template, kat reasoning parser)"),
}


def _read_text(path: Optional[str]) -> tuple[str, str]:
    """(name, text) of FILE or stdin ('-'): UTF-8 text only; folders, missing files and binary data are errors."""
    if path in (None, "-"):
        name, data = "<stdin>", sys.stdin.buffer.read()
    else:
        name = path
        if Path(path).is_dir():
            raise InputError(path, "a folder, not a file")
        if not Path(path).is_file():
            raise InputError(path, "file not found")
        data = Path(path).read_bytes()
    if b"\0" in data:
        raise InputError(name, "binary data (it holds NUL bytes), not text", line=data[: data.index(b"\0")].count(b"\n") + 1)
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(name, f"not UTF-8 text (byte 0x{data[exc.start]:02x})", line=line) from None


def _template(args) -> int:
    from katdata import template

    if args.action == "parse":
        parsed = template.parse(_read_text(args.file)[1])
        print(json.dumps(parsed.model_dump(), ensure_ascii=False))
        return 0 if parsed.ok else EXIT_CHECK_FAILED
    if args.action == "render":
        try:
            print(template.render(args.mode, args.judge, args.answer, args.think), end="")
        except template.TemplateError as exc:
            raise KatdataError(f"template render: {exc}") from None
        return 0
    if args.action == "chat-template":
        from katdata.chat_template import template_text

        print(template_text(training=args.training), end="")
        return 0
    return _validate_file(args.file, args.field)


def _validate_file(path: Optional[str], field: str) -> int:
    from collections import Counter

    from katdata import template

    if not path:
        raise KatdataError("template validate needs a FILE.jsonl")
    name, text = _read_text(path)
    counts, bad, total = Counter(), 0, 0
    for n, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028 and friends: split on \n only
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(name, f"broken JSON ({exc.msg})", line=n) from exc
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(name, "missing or non-text field", line=n, field=field)
        total += 1
        p = template.parse(row[field], row.get("finish_reason"))
        bad += not p.ok
        counts.update(p.errors)
    if not total:
        raise InputError(name, "found no records (the file is empty)")
    print(json.dumps({"records": total, "valid": total - bad, "invalid": bad, "errors": dict(counts)}))
    return EXIT_CHECK_FAILED if bad else 0


def _model(args) -> int:
    from katdata.model import embedded_path

    print(embedded_path())
    return 0


def _run(args) -> int:
    from katdata import pipeline, recipe_registry
    from katdata.recipe import load_recipe

    args.recipe = str(recipe_registry.resolve(args.recipe))  # a file, else a packaged recipe's name
    recipe = load_recipe(args.recipe, args.set)  # every recipe problem, before any folder or model
    run_dir = Path(args.run_dir or recipe.run_dir.format(name=recipe.name))
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{'--run-dir' if args.run_dir else 'run_dir'} {run_dir}: exists and is not a folder")
    return pipeline.main_run(args)


def _validate(args) -> int:
    from katdata import recipe_registry
    from katdata.recipe import load_recipe

    for given in args.recipes:
        path = recipe_registry.resolve(given)  # a file, else a packaged recipe's name
        load_recipe(path)  # schema, engine names, local paths, run_dir template: no model, no data read
        print(f"ok  {given}" + (f"  (packaged: {path})" if str(path) != given else ""))
    return 0


def _ls(args) -> int:
    from katdata import recipe_registry

    root = Path(args.dir) if args.dir else None
    if root is not None and not root.is_dir():
        if root.is_symlink():
            try:
                root.resolve(strict=True)
            except RuntimeError:
                raise InputError(root, "a symlink loop") from None
            except OSError:
                raise InputError(root, "a broken symlink") from None
        raise InputError(root, "not a folder" if root.exists() else "no such folder")
    recipes = recipe_registry.packaged()
    others = {k: v for k, v in recipe_registry.packaged(everything=True).items() if k not in recipes}
    width = max(map(len, [*recipes, *others]), default=0)
    print("recipes (katdata run NAME; katdata cp NAME [DEST] copies one to edit):")
    for name, path in recipes.items():
        print(f"  {name:<{width}}  {recipe_registry.description(path)}")
    if others:
        print("other files (katdata cp NAME):")
        for name, path in others.items():
            print(f"  {name:<{width}}  {recipe_registry.description(path)}")
    if root is not None:
        print(f"recipes in {root}:")
        for path in sorted(root.glob("*.yaml")):
            print(f"  {path}  {recipe_registry.description(path)}")
    print("stages, in order (katdata run RECIPE --from NAME / --until NAME):")
    for stage in all_stages():
        written = ", ".join(stage.files(stage.writes))
        print(f"  {stage.name:<13} {stage.help}{' (optional)' if stage.optional else ''} -> {written}")
    return 0


def _cp(args) -> int:
    from katdata import recipe_registry

    target = recipe_registry.copy(args.name, args.dest)
    then = f"; edit it, then: katdata run {shlex.quote(str(target))}" if recipe_registry.is_recipe(args.name) else ""
    print(f"copied {args.name} to {target}{then}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="katdata", description="Build KAT adaptive-thinking data and adapt a model to it.",
                                epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"katdata {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the INFO lines of other libraries")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also KATDATA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (resumes in an existing run folder)")
    run.add_argument("recipe", help="a recipe file, or the name of a packaged recipe (katdata ls)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key (YAML scalar)")
    run.add_argument("--run-dir", help="run folder (default: the recipe's run_dir)")
    run.add_argument("--from", dest="from_stage", help="first stage to run")
    run.add_argument("--until", help="last stage to run")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check recipes without running them")
    val.add_argument("recipes", nargs="+", help="recipe files or packaged recipe names")
    val.set_defaults(func=_validate)

    ls = sub.add_parser("ls", help="list the packaged recipes (and those in --dir) and the stages")
    ls.add_argument("--dir", help="also list the recipes (*.yaml) in this folder")
    ls.set_defaults(func=_ls)

    cp = sub.add_parser("cp", help="copy a packaged recipe to edit (never overwrites a file)")
    cp.add_argument("name", help="a packaged recipe (katdata ls), e.g. quickstart or accelerate/multi_gpu")
    cp.add_argument("dest", nargs="?", help="a file, or a folder to hold NAME.yaml (default: ./NAME.yaml)")
    cp.set_defaults(func=_cp)

    tpl = sub.add_parser("template", help="render, parse and validate KAT responses; print the chat template")
    tsub = tpl.add_subparsers(dest="action", required=True)
    tp = tsub.add_parser("parse", help="parse a response (FILE or - for stdin); prints JSON; exit 1 if it is invalid")
    tp.add_argument("file", nargs="?", default="-")
    tr = tsub.add_parser("render", help="render a response byte-exact")
    tr.add_argument("--mode", choices=["on", "off"], required=True)
    tr.add_argument("--judge", required=True)
    tr.add_argument("--think")
    tr.add_argument("--answer", required=True)
    tv = tsub.add_parser("validate", help="count template errors in a JSONL file; exit 1 if any record is invalid")
    tv.add_argument("file")
    tv.add_argument("--field", default="response")
    tc = tsub.add_parser("chat-template", help="print the Jinja chat template")
    tc.add_argument("--training", action="store_true", help="the variant with {% generation %} markers")
    tpl.set_defaults(func=_template)

    mdl = sub.add_parser("model", help="the embedded model")
    msub = mdl.add_subparsers(dest="action", required=True)
    msub.add_parser("path", help="print (and on first use create) the embedded model's folder")
    mdl.set_defaults(func=_model)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("KATDATA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    first = next((i for i, a in enumerate(argv) if a not in ("-v", "--verbose")), len(argv))
    if first < len(argv) and argv[first] in DELEGATED:  # `katdata [-v] train ...`
        argv = argv[first:] + argv[:first]
        target = importlib.import_module(DELEGATED[argv[0]][0])
        _configure_logging("-v" in argv or "--verbose" in argv)
        rest = [a for a in argv[1:] if a not in ("-v", "--verbose")]
        if hasattr(target, "main"):
            return _guard(lambda: target.main(rest), debug)
        from katdata import stage_command

        return _guard(lambda: stage_command.main(argv[0], rest), debug)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _configure_logging(args.verbose)
    return _guard(lambda: args.func(args), debug)


def _guard(fn, debug: bool = False) -> int:
    """Run a command; any error becomes one line on stderr and its class's exit code (katdata.errors)."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print("katdata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        return report(exc)


class _BarSafeHandler(logging.StreamHandler):
    """Writes each log line through tqdm, which lifts the progress bars off the screen and redraws them
    under the line: a log line never lands on a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own way of reporting a broken handler
            self.handleError(record)


def _configure_logging(verbose: bool) -> None:
    """katdata's INFO lines (DEBUG with -v) and only the warnings of other libraries (their INFO with -v).

    Set before those libraries are imported (each reads its environment then, and passes it to the
    processes it starts; a value the user set stays): vLLM's own log handler writes to stderr, not
    stdout, and only WARNING and up without -v; datasets' progress bars (a bar per map over a few rows)
    only with -v. The training stages' printed log dicts follow -v too (katdata.train_progress)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    floor = logging.INFO if verbose else logging.WARNING
    handler.addFilter(lambda record: record.levelno >= floor or record.name.split(".")[0] == "katdata")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # Python warnings too go through the handler, off the bars' lines

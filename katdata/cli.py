"""The `katdata` command: `main(argv) -> int`, subcommands dispatched lazily.

`katdata --help` imports nothing heavy; each command imports its stage module when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from katdata import __version__
from katdata.errors import KatdataError

# commands whose module has its own `main(argv) -> int`
DELEGATED = {
    "tag": ("katdata.tag", "tag a run's queries (rule prior + LLM tagger)"),
    "solve": ("katdata.solve", "think-on traces from the solver / thinker / critic agents"),
    "sample": ("katdata.sample", "sample N responses per mode per query (mode forced by the prefix)"),
    "vote": ("katdata.vote", "majority vote over verified samples: the mode labels"),
    "calibrate": ("katdata.calibrate", "fit the tagger's p(needs reasoning) to a run's vote outcomes"),
    "judge": ("katdata.judge", "write and check the judge rationales"),
    "assemble": ("katdata.assemble", "render the final KAT records"),
    "export": ("katdata.export", "write the Hub dataset folder (and card) of a run"),
    "train": ("katdata.train", "LoRA-fine-tune a model on a run's dataset (--audit N shows the loss spans)"),
    "eval": ("katdata.evaluate", "evaluate base vs adapted model: think rate, mode choice, accuracy, tokens"),
    "review": ("katdata.review", "push records to Argilla for human review, pull annotations back"),
    "serve": ("katdata.servers", "serve a model folder with vLLM's OpenAI-compatible server on 127.0.0.1"),
}


def _template(args) -> int:
    from katdata import template

    if args.action == "parse":
        text = sys.stdin.read() if args.file in (None, "-") else Path(args.file).read_text("utf-8")
        print(json.dumps(template.parse(text).model_dump(), ensure_ascii=False))
        return 0
    if args.action == "render":
        print(template.render(args.mode, args.judge, args.answer, args.think), end="")
        return 0
    if args.action == "chat-template":
        from katdata.chat_template import template_text

        print(template_text(training=args.training), end="")
        return 0
    return _validate_file(args.file, args.field)


def _validate_file(path: Optional[str], field: str) -> int:
    from collections import Counter

    from katdata import template
    from katdata.errors import InputError

    if not path:
        raise KatdataError("template validate needs a FILE.jsonl")
    counts, bad, total = Counter(), 0, 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"broken JSON ({exc.msg})", line=n) from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise InputError(path, "missing or non-text field", line=n, field=field)
            total += 1
            p = template.parse(row[field], row.get("finish_reason"))
            bad += not p.ok
            counts.update(p.errors)
    print(json.dumps({"records": total, "valid": total - bad, "invalid": bad, "errors": dict(counts)}))
    return 1 if bad else 0


def _model(args) -> int:
    from katdata.model import embedded_path

    print(embedded_path())
    return 0


def _run(args) -> int:
    from katdata import pipeline

    return pipeline.main_run(args)


def _validate(args) -> int:
    from katdata.recipe import load_recipe

    for path in args.recipes:
        load_recipe(path)
        print(f"ok  {path}")
    return 0


def _ls(args) -> int:
    from katdata.pipeline import STAGES

    root = Path(args.dir)
    print("recipes:")
    for path in sorted(root.glob("*.yaml")):
        first = path.read_text("utf-8").splitlines()[:1]
        print(f"  {path}  {first[0].lstrip('# ') if first else ''}")
    print("stages: " + " -> ".join(STAGES))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="katdata", description="Build KAT adaptive-thinking data and adapt a model to it.")
    p.add_argument("--version", action="version", version=f"katdata {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (resumes in an existing run folder)")
    run.add_argument("recipe")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key (YAML scalar)")
    run.add_argument("--run-dir", help="run folder (default: the recipe's run_dir)")
    run.add_argument("--from", dest="from_stage", help="first stage to run")
    run.add_argument("--until", help="last stage to run")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check recipes without running them")
    val.add_argument("recipes", nargs="+")
    val.set_defaults(func=_validate)

    ls = sub.add_parser("ls", help="list recipes and stages")
    ls.add_argument("--dir", default="recipes")
    ls.set_defaults(func=_ls)

    tpl = sub.add_parser("template", help="render, parse and validate KAT responses; print the chat template")
    tsub = tpl.add_subparsers(dest="action", required=True)
    tp = tsub.add_parser("parse", help="parse a response (FILE or - for stdin); prints JSON")
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
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        target = DELEGATED[argv[0]][0]
        _configure_logging("-v" in argv or "--verbose" in argv)
        return _guard(lambda: importlib.import_module(target).main([a for a in argv[1:] if a not in ("-v", "--verbose")]))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _configure_logging(args.verbose)
    return _guard(lambda: args.func(args))


def _guard(fn) -> int:
    try:
        return int(fn() or 0)
    except KatdataError as exc:
        print(f"katdata: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("katdata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

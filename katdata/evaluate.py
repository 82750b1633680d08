"""Stage `eval`: base vs adapted model on held-out queries (`katdata eval`).

The held-out rows are those `katdata train` listed in ``train/split.json`` (the export's test split,
or its own seeded hold-out). Each model answers each query in three settings:

- ``auto``: the prompt pre-fills ``<judge>\\n`` and the model picks its mode;
- ``on`` / ``off``: the prompt pre-fills the tags-written rationale for that mode (``judge.tags_rationale``)
  and the mode prefix (forced mode).

Every completion is kept in ``eval/generations.jsonl`` (with its parse errors; rerun skips what is
there), and ``eval/eval.json`` holds the metrics: template validity, think-on rate (overall, by
difficulty, by domain), agreement of the chosen mode with the vote label, accuracy in the chosen and
forced modes, mean tokens against always-think, and whether the judge rationale argues for the mode it
chose (a keyword heuristic, stated as such). Plots: think-on rate by difficulty, token histograms by
mode, accuracy against tokens.

The adapted model: ``adapted_engine`` (a recipe engine that loads the adapter), else the base engine's
backend rebuilt with ``lora_path`` (transformers: peft; vLLM: a LoRARequest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from katdata import benchmarks
from katdata.benchmarks import BenchmarkConfig
from katdata.eval_items import Item, accuracy, counted_tokens, mean, prefix, rate, verdict  # noqa: F401  (Item: also katdata.evaluate's)
from katdata.errors import KatdataError, require
from katdata.judge import keyword_stance
from katdata.runfiles import RowWriter, done_keys, query_meta
from katdata.run_folder import RunFolder
from katdata.settings import no_output_key
from katdata.stage import Stage
from katdata.template import ANSWER_OPEN, STOP_STRINGS, THINK_CLOSE, THINK_OPEN, parse

log = logging.getLogger(__name__)

# Forced modes pre-fill the rationale the tags writer gives the query for that mode
# (prompts/judge_tags.yaml): the judge is not what is measured there.


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _no_output = model_validator(mode="before")(classmethod(lambda cls, data: no_output_key(data, "eval")))

    engine: str = Field("default", description="recipe engine of the base model (the one the adapter was trained on)")
    adapted_engine: Optional[str] = Field(None, description="recipe engine that already loads the adapter; None = the "
                                          "base engine's backend rebuilt with lora_path = the adapter")
    adapter: Optional[str] = Field(None, description="adapter folder; default RUN_DIR/train/adapter")
    rl_adapter: Optional[str] = Field(None, description="RL adapter, evaluated as model 'rl' next to base and SFT "
                                      "('adapted'); default RUN_DIR/rl/adapter when it exists; 'none' = skip")
    limit: Optional[int] = Field(None, ge=1, description="evaluate at most this many held-out queries")
    forced: bool = Field(True, description="also run the adapted model in forced think-on and think-off modes")
    base_forced: bool = Field(False, description="also run the base model in the forced modes")
    max_tokens: int = Field(256, ge=8, description="token limit of one response")
    repetition_penalty: float = Field(1.0, ge=1.0, description="> 1 damps tokens already seen (greedy decoding of a "
                                      "small model loops without it); 1 = plain greedy")
    frequency_penalty: float = Field(0.0, ge=0, le=2, description="OpenAI's frequency_penalty: each token's logit "
                                     "minus this times its count in the reply so far (vLLM, OpenAI-compatible "
                                     "servers, transformers); breaks the '0000...' loops that repetition_penalty "
                                     "damps only once; 0 = off")
    think_reserve: Optional[int] = Field(None, ge=1, description="a decoding-side stop, off by default (None): a "
                                         "reply still going after max_tokens - think_reserve tokens goes on for the "
                                         "last think_reserve tokens; if its think block is open, it is closed first "
                                         "(</think> and <answer> appended): such rows carry think_closed: true and "
                                         "eval.json counts them")
    chunk: int = Field(16, ge=1, description="unused since eval streams its requests (kept so older recipes load)")
    plots: bool = Field(True, description="write the PNG plots")
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list, description="benchmarks every model answers "
                                              "too, each a packaged set by name (gsm8k, aime2025, humaneval, "
                                              "fanoutqa) or a file, with its limit, k and settings "
                                              "(katdata.benchmarks); [] = the held-out split alone")
    grader_engine: Optional[str] = Field(None, description="engine of the LLM grader of open answers (FanOutQA); "
                                         "None = open answers get no verdict (counted as unverified)")
    num_threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch while generating; None = torch's "
                                       "default (1 avoids thread contention on a CPU shared with other jobs)")

    @field_validator("benchmarks")
    @classmethod
    def _distinct(cls, specs: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.name for b in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the benchmark name {', '.join(twice)} is given twice (name file benchmarks apart)")
        return specs


def heldout(run_dir: Path, limit: Optional[int], rows: Optional[list[dict]] = None) -> list[Item]:
    """The held-out rows named in train/split.json, read from the same data as training (``rows``: those rows,
    when the caller has read them)."""
    from katdata.train_data import split_rows

    rows = split_rows(run_dir, "heldout", "it lists the held-out ids") if rows is None else rows
    metas = query_meta(run_dir, rows)
    items = [Item(r["id"], r["messages"][:-1], r["vote"].get("label") or r["mode"], r["tags"].get("difficulty"),
                  str(r["tags"].get("domain") or "unknown"), str(r["tags"].get("task_type") or "other"),
                  r["kind"], r["reference"], r["query"], metas[r["id"]])
             for r in rows]
    if limit and limit < len(items):  # a prefix that keeps the labels mixed: interleave them
        groups = [[it for it in items if str(it.label) == m] for m in sorted({str(it.label) for it in items})]
        items = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)][:limit]
    return items


def _think_open(text: str) -> bool:
    return THINK_OPEN in text and THINK_CLOSE not in text[text.rindex(THINK_OPEN):]


def generate(backend, model: str, settings: str | list[str], items: list[Item], cfg: EvalConfig, writer: RowWriter,
             done: set, verifier) -> None:
    """Answer the items not yet done in these settings of ``model``, all in one stream (one wave on an in-process
    engine); write one row per completion as it comes in."""
    from katdata.backends.base import Job, Request, SamplingParams

    reserve = cfg.think_reserve or 0
    settings = [settings] if isinstance(settings, str) else settings
    todo = [(s, it) for s in settings for it in items if f"{model}:{s}:{it.id}" not in done]
    params = SamplingParams(temperature=0.0, max_tokens=max(1, cfg.max_tokens - reserve), stop=tuple(STOP_STRINGS),
                            repetition_penalty=cfg.repetition_penalty, frequency_penalty=cfg.frequency_penalty)
    jobs = (Job((s, it), Request(it.messages, prefix(s, it)), params) for s, it in todo)
    # think_reserve: a reply cut at max_tokens - reserve goes on for the last `reserve` tokens; if its think block
    # is still open, it is closed first (think_closed), so the answer gets the reserve
    pending = []
    for job, comps in backend.stream(jobs):  # each row written as soon as its completion is in
        (setting, it), pre, c = job.key, job.request.prefix, comps[0]
        if reserve and c.finish_reason == "length":
            pending.append((setting, it, pre, c))
            continue
        _write(writer, model, setting, it, pre, c.text, c.finish_reason, c.completion_tokens, c.error, verifier,
               prompt_tokens=c.prompt_tokens)
    if pending:
        params = dataclasses.replace(params, max_tokens=reserve)
        jobs = []
        for setting, it, pre, c in pending:
            text, closed = c.text, _think_open(pre + c.text)
            if closed:
                text += ("" if text.endswith("\n") else "\n") + f"{THINK_CLOSE}\n{ANSWER_OPEN}\n"
            jobs.append(Job((setting, it, pre, text, c.completion_tokens, c.prompt_tokens, closed),
                            Request(it.messages, pre + text), params))
        for job, comps in backend.stream(iter(jobs)):
            (setting, it, pre, text, used, prompt, closed), c = job.key, comps[0]
            _write(writer, model, setting, it, pre, text + c.text, c.finish_reason,
                   used + c.completion_tokens, c.error, verifier, think_closed=closed, prompt_tokens=prompt)


def _write(writer, model, setting, it, pre, text, finish_reason, tokens, error, verifier, think_closed=False,
           prompt_tokens=0):
    p = parse(pre + text, finish_reason)
    mode = p.mode if setting == "auto" else setting
    correct = verdict(verifier, it, p.answer)
    writer.write({"key": f"{model}:{setting}:{it.id}", "model": model, "setting": setting, "id": it.id,
                  "prefix": pre, "text": text, "finish_reason": finish_reason,
                  "tokens": tokens, "ok": p.ok, "errors": p.errors, "mode": mode, "label": it.label,
                  "difficulty": it.difficulty, "domain": it.domain, "correct": correct,
                  "stance": keyword_stance(p.judge) if setting == "auto" else None, "error": error,
                  "think_closed": think_closed, "prompt_tokens": prompt_tokens})


def metrics(rows: list[dict]) -> dict:
    """The eval.json metrics of one model from its generation rows."""
    by = defaultdict(list)
    for r in rows:
        by[r["setting"]].append(r)
    auto = by["auto"]
    moded = [r for r in auto if r["mode"]]
    out: dict = {"n": len(auto), "template_validity": rate(auto, lambda r: r["ok"]),
                 # cut by the token limit is a state, not a template error: valid + truncated + malformed = 1
                 "truncated": rate(auto, lambda r: r["finish_reason"] == "length"),
                 "malformed": rate(auto, lambda r: not r["ok"] and r["finish_reason"] != "length"),
                 "think_on_rate": rate(moded, lambda r: r["mode"] == "on"),
                 "think_closed": rate(auto, lambda r: r.get("think_closed")),  # think_reserve closed the block
                 "mode_agreement": rate([r for r in auto if r["label"]], lambda r: r["mode"] == r["label"]),
                 "mode_agreement_valid": rate([r for r in auto if r["label"] and r["ok"]],
                                               lambda r: r["mode"] == r["label"])}
    for key in ("difficulty", "domain"):
        groups = defaultdict(list)
        for r in moded:
            groups[str(r[key])].append(r)
        out[f"think_on_rate_by_{key}"] = {g: {"n": len(v), "rate": rate(v, lambda r: r["mode"] == "on")}
                                          for g, v in sorted(groups.items())}
    errors = defaultdict(int)
    for r in auto:
        for e in r["errors"]:
            errors[e] += 1
    out["parse_errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
    # per setting (auto, forced on, forced off): accuracy, template validity ("valid"), mean tokens
    out["settings"] = {s: {"n": len(v), "accuracy": accuracy(v), "valid": rate(v, lambda r: r["ok"]),
                           "think_closed": rate(v, lambda r: r.get("think_closed")),
                           "mean_tokens": mean([r["tokens"] for r in v]),
                           "mean_tokens_by_mode": {m: mean([r["tokens"] for r in v if r["mode"] == m])
                                                   for m in ("on", "off")}}
                       for s, v in sorted(by.items())}
    if by.get("on") and auto:
        on, am = out["settings"]["on"], out["settings"]["auto"]
        # always-think's prompt pre-fills the judge and the mode line that auto writes itself: its replies count
        # those tokens too (its prompt tokens minus auto's on the same query), so both count the same span
        auto_prompt = {r["id"]: r.get("prompt_tokens") or 0 for r in auto}
        always = mean([counted_tokens(r["tokens"], r.get("prompt_tokens"), auto_prompt[r["id"]])
                        for r in by["on"] if r["id"] in auto_prompt])
        out["tokens_vs_always_think"] = round(am["mean_tokens"] / always, 4) if always else None
        # the tokens auto saves against always-think, read next to what it costs in accuracy
        out["token_saving"] = {"saving": round(1 - out["tokens_vs_always_think"], 4)
                               if out["tokens_vs_always_think"] is not None else None,
                               "mean_tokens_auto": am["mean_tokens"], "mean_tokens_always_think": always,
                               "accuracy_auto": am["accuracy"], "accuracy_always_think": on["accuracy"],
                               "always_think_counts": "its reply plus the judge and mode line its prompt pre-filled"}
    judged = [r for r in auto if r["ok"]]
    out["judge_consistency"] = {"n": len(judged), "unclear": sum(1 for r in judged if r["stance"] is None),
                                "rate": rate([r for r in judged if r["stance"]], lambda r: r["stance"] == r["mode"]),
                                "method": "keyword cues in the rationale (heuristic)"}
    return out


def _adapted(cfg: EvalConfig, run_dir: Path, engine, base, adapter: Optional[Path] = None):
    if cfg.adapted_engine and adapter is None:
        return engine(cfg.adapted_engine), False
    from katdata.backends import get_backend

    adapter = adapter or (Path(cfg.adapter) if cfg.adapter else RunFolder(run_dir).adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise KatdataError(f"no adapter at {adapter}: run `katdata train` first, or set eval.adapter")
    train_json = RunFolder(run_dir).train_record
    markers = train_json.is_file() and json.loads(train_json.read_text()).get("marker_tokens")
    if markers and base.name == "vllm":
        raise KatdataError("this adapter adds marker tokens: vLLM cannot serve it un-merged; evaluate the merged model "
                           "(train.merge: true) or use the transformers backend")
    if not markers:  # one engine: the adapter switched on for adapted requests only (one copy of the weights)
        view = getattr(base, "backend", base).with_adapter(str(adapter))
        if view is not None:
            return view, False
    return get_backend(base.name, base.config.model_copy(update={"lora_path": str(adapter)})), True


def _set_threads(n: Optional[int]) -> Optional[int]:
    """Set torch's CPU threads when asked (and torch is loaded); returns the previous count."""
    if not n:
        return None
    import sys

    torch = sys.modules.get("torch") or require("torch", "local")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def run(cfg: EvalConfig, run_dir: Path, engine, sandbox=None, decontaminate=None) -> dict:
    """Generate (resuming), score, plot; returns the metrics (also in OUTPUT/eval.json). ``decontaminate``: the
    recipe's section, whose n-gram settings count the benchmarks' items in the training records."""
    from katdata import fingerprint
    from katdata.verify import Verifier

    run_dir = Path(run_dir)
    out = RunFolder(run_dir).eval
    from katdata.output_paths import check_replaceable  # new, empty or its own: never a user's folder
    check_replaceable(out, run_dir=run_dir, kind="eval")
    settings = fingerprint.section_settings("eval", cfg)
    described = getattr(engine, "settings", None)  # the engines' own settings, where the caller can say them
    for name in fingerprint.engine_names(cfg) if described else []:
        settings |= fingerprint.flatten({"engines": {name: described(name)}})
    inputs = fingerprint.hash_inputs(_eval_inputs(cfg, run_dir), run_dir)
    current = {"settings": settings, "inputs": inputs}
    fingerprint.check_folder(out, current, f"to evaluate again, move {out} aside (in a pipeline: rerun with --from "
                             "eval); to keep it, copy the run folder and evaluate in the copy")
    from katdata.train_data import split_parts

    # the data read once: the held-out items, and the training queries the benchmarks' contamination counts
    split = split_parts(run_dir, ("heldout", "train") if cfg.benchmarks else ("heldout",), "it lists the held-out ids")
    items = heldout(run_dir, cfg.limit, split["heldout"])  # checked before the folder is made
    bench_items = {spec.name: benchmarks.items(spec) for spec in cfg.benchmarks}  # a bad file: before any model
    from katdata.preflight import check_adapters  # loaded after the base model's generations: checked now

    adapter = None if cfg.adapted_engine else cfg.adapter or str(run_dir / "train" / "adapter")
    check_adapters(run_dir, {"adapter": adapter, "rl_adapter": cfg.rl_adapter})
    grader = engine(cfg.grader_engine) if cfg.grader_engine else None
    verifier = Verifier(sandbox=sandbox, grader=grader)  # the recipe's `sandbox:` section
    isolation = verifier.code_isolation(items + [it for its in bench_items.values() for it in its])
    out.mkdir(parents=True, exist_ok=True)  # (code checks that can't be isolated are refused above)
    fingerprint.write_folder(out, current)
    gen_path, bench_path = out / "generations.jsonl", out / "benchmarks.jsonl"
    done, bench_done = done_keys(gen_path, key="key"), done_keys(bench_path, key="key")
    plan = [("base", "auto")] + ([("base", "on"), ("base", "off")] if cfg.base_forced else [])
    plan += [("adapted", "auto")] + ([("adapted", "on"), ("adapted", "off")] if cfg.forced else [])
    rl_adapter = None if cfg.rl_adapter == "none" else Path(cfg.rl_adapter or run_dir / "rl" / "adapter")
    if rl_adapter and (cfg.rl_adapter or (rl_adapter / "adapter_config.json").is_file()):
        plan += [("rl", "auto")] + ([("rl", "on"), ("rl", "off")] if cfg.forced else [])
    models = list(dict.fromkeys(m for m, _ in plan))
    bench_keys = benchmarks.wanted_keys(cfg.benchmarks, bench_items, models)
    keys_of = {m: benchmarks.wanted_keys(cfg.benchmarks, bench_items, [m]) for m in models}
    penalties = {"repetition_penalty": cfg.repetition_penalty, "frequency_penalty": cfg.frequency_penalty}

    def answer(backend, name: str) -> None:  # the held-out split, then each benchmark
        generate(backend, name, [s for m, s in plan if m == name], items, cfg, writer, done, verifier)
        for spec in cfg.benchmarks:
            benchmarks.generate(backend, name, spec, bench_items[spec.name], cfg.max_tokens, penalties, bench_writer,
                                bench_done, verifier)

    def missing(name: str) -> bool:
        return (any(f"{m}:{s}:{it.id}" not in done for m, s in plan if m == name for it in items)
                or any(k not in bench_done for k in keys_of[name]))

    threads = _set_threads(cfg.num_threads)
    try:
        from katdata.report import FileProgress  # a bar per row written, moving as completions finish
        with FileProgress([gen_path, bench_path], len(plan) * len(items) + len(bench_keys), "eval", unit="row"), \
                RowWriter(gen_path) as writer, RowWriter(bench_path) as bench_writer:
            base = engine(cfg.engine)
            dtype = getattr(getattr(base, "backend", base), "dtype_name", None)  # the adapters run on the same base
            answer(base, "base")
            for name in models[1:]:  # the SFT adapter, then the RL adapter when there is one
                if missing(name):
                    adapted, owned = _adapted(cfg, run_dir, engine, base, rl_adapter if name == "rl" else None)
                    try:
                        answer(adapted, name)
                    finally:
                        if owned:
                            adapted.close()
    finally:
        _set_threads(threads)
    wanted = {it.id for it in items}
    rows = [r for r in _read(gen_path) if r["id"] in wanted and (r["model"], r["setting"]) in plan]
    result = {**({"sandbox": isolation} if isolation else {}), "dtype": dtype, "heldout": len(items),
              "labels": {m: sum(it.label == m for it in items) for m in ("on", "off")},
              "models": {m: metrics([r for r in rows if r["model"] == m]) for m in models}}
    if cfg.benchmarks:
        result |= benchmarks.results(cfg.benchmarks, bench_items, benchmarks.read_rows(bench_path, bench_keys),
                                     [r["query"] for r in split["train"]], out if cfg.plots else None, decontaminate)
    if "rl" in result["models"]:
        from katdata.rl import side_by_side

        result["side_by_side"] = side_by_side(result["models"])
    if cfg.plots:
        from katdata.eval_plots import heldout_plots

        result["plots"] = heldout_plots(rows, out)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "eval.json")
    return result


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def main(argv: list[str] | None = None) -> int:
    """`katdata eval RUN_DIR`: the eval stage as a stage command (katdata.stage_command), on the recipe's engines
    (``--backend`` / ``--model`` set the base engine's); a folder without recipe.yaml (a `katdata train` folder)
    runs from the flags alone, on the base model train.json names."""
    import sys

    from katdata import stage_command

    def extra(p):
        p.add_argument("--backend", help="the base engine's backend: transformers or vllm (no recipe: transformers)")
        p.add_argument("--model", help="the base engine's model (no recipe: the one train.json names, else the "
                       "embedded model)")
        p.add_argument("--benchmark", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                       help="a benchmark to evaluate too, e.g. gsm8k:limit=8,k=2,settings=auto+on or a file "
                       "(data.jsonl:limit=50); repeatable; replaces eval.benchmarks")

    def engine_sets(args):
        name = args.setting_engine or "default"
        return [f"engines.{name}.{key}={value}" for key, value in (("backend", args.backend), ("model", args.model))
                if value] + _benchmark_sets(args)

    return stage_command.main("eval", list(sys.argv[1:] if argv is None else argv), extra=extra, bare=_bare,
                              sets=engine_sets, show=print_result)


def _benchmark_sets(args) -> list[str]:
    """``--benchmark`` flags as the recipe key they set."""
    from katdata.benchmarks import parse_flag

    return [f"eval.benchmarks={json.dumps([parse_flag(b) for b in args.benchmark])}"] if args.benchmark else []


def _bare(args) -> int:
    """`katdata eval` on a folder without recipe.yaml: one engine from --backend / --model for both models."""
    from katdata import stage_command
    from katdata.backends import EngineConfig, get_backend
    from katdata.fingerprint import engine_settings
    from katdata.preflight import run_folder, train_record

    args.set = [*_benchmark_sets(args), *(args.set or [])]
    cfg = stage_command.section(STAGE, args)
    backend = args.backend or "transformers"
    model = args.model or train_record(args.run_dir).get("base_model")
    run_folder(args.run_dir, "eval", backend=backend,  # before torch is imported or any folder is made
               models={"--model" if args.model else "train/train.json base_model": model})
    built, config = {}, EngineConfig(backend=backend, model=model)

    def engine(name):
        if name not in built:
            built[name] = get_backend(backend, config)
        return built[name]

    engine.settings = lambda name: engine_settings(config)
    try:
        from katdata.sandbox import SandboxConfig

        result = run(cfg, args.run_dir, engine, sandbox=SandboxConfig())
    finally:
        for b in built.values():
            b.close()
    print_result(result, args.run_dir)
    return 0


def print_result(result: dict, run_dir: Path) -> None:
    for name, m in result["models"].items():
        print(f"{name}: validity {m['template_validity']}, think-on {m['think_on_rate']}, "
              f"mode agreement {m['mode_agreement']}, accuracy {m['settings'].get('auto', {}).get('accuracy')}")
        for setting, v in m["settings"].items():
            print(f"  {setting:>4}: accuracy {v['accuracy']}, validity {v['valid']}, mean tokens {v['mean_tokens']}")
        if m.get("token_saving"):
            t = m["token_saving"]
            print(f"  auto saves {t['saving']} of always-think's tokens (accuracy {t['accuracy_auto']} against "
                  f"{t['accuracy_always_think']})")
    for name, bench in result.get("benchmarks", {}).items():
        from katdata.bench_figures import table_lines

        c = bench["contamination"]
        print("\n".join(["", *table_lines(name, bench),
                         f"  {c['in_training']} of its {c['items']} items appear in the run's training queries"]))
    print(f"wrote {RunFolder(run_dir).eval / 'eval.json'}")


def _eval_inputs(cfg: EvalConfig, run_dir: Path) -> list[Path]:
    """What eval reads: the held-out split, the adapter unless an engine already loads it, benchmark files."""
    folder = RunFolder(run_dir)
    return ([folder.split] + ([] if cfg.adapted_engine else [Path(cfg.adapter) if cfg.adapter else folder.adapter])
            + [Path(b.path) for b in cfg.benchmarks if b.path])  # a changed benchmark file is a changed input


STAGE = Stage("eval", "evaluate base vs adapted model: think rate, mode choice, accuracy, tokens",
              lambda ctx: run(ctx.cfg, ctx.folder.root, ctx.engines, sandbox=ctx.section("sandbox"),
                              decontaminate=ctx.section("decontaminate")), EvalConfig,
              reads=("split",), writes=("eval",), sections=("sandbox", "decontaminate"), optional=True,
              inputs=lambda recipe, run_dir: _eval_inputs(recipe.eval, run_dir))


if __name__ == "__main__":
    raise SystemExit(main())

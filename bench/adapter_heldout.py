"""Does the quickstart adapter hold on queries it never saw? Template validity and mode agreement on held-out queries.

Held-out set: GSM8K test problems, one-step sums from GSM8K's calculator notes and FanOutQA single-hop
facts (the quickstart's kinds), none of whose ids or query texts is in the run's queries.jsonl (the
quickstart never saw them, in any stage). Their labels come from the same procedure as the run's own:
the labelling recipe (default the packaged quickstart: base model, tag, two-mode sampling, vote, tagger
prior where no sample is right; its solve stage is skipped, as it changes no label), in OUT/labels/ (kept:
a rerun reuses them).

The adapter (RUN/train/adapter, or one trained here with ``--train KEY=VALUE`` overrides of the run's
``train:`` section, into OUT/train-bench-<settings>/: the run folder is only read) then answers each query greedily: ``auto`` (it
writes the judge and picks the mode), and with ``--forced`` also forced think-on and think-off.
Printed and written to OUT/<adapter name>.json: template validity (a reply cut at the token limit counts
as invalid), truncated and malformed shares, agreement of the chosen mode with the label, accuracy per
chosen mode and per forced mode, mean tokens.

    .venv/bin/python bench/adapter_heldout.py runs/quickstart [--n 16] [--max-tokens 256] [--forced]
        [--train max_steps=96 --train learning_rate=2e-3] [--adapter DIR]

The target of issue 15 section 4: validity >= 0.99 and agreement >= 0.90 on at least 40 queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from katdata import sources  # noqa: E402
from katdata.records import Query  # noqa: E402

KINDS = ("gsm8k", "gsm8k-calc", "fanoutqa-hop")


def kind_of(qid: str) -> str:
    return "gsm8k-calc" if qid.startswith("gsm8k-calc-") else "gsm8k" if qid.startswith("gsm8k-") else "fanoutqa-hop"


def heldout_queries(run_dir: Path, n: int, seed: int) -> list[Query]:
    """``n`` queries of each quickstart kind whose id and text the run never saw."""
    seen_ids, seen_text = set(), set()
    with open(run_dir / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            seen_ids.add(q["id"])
            seen_text.add(q["query"].strip().lower())
    out = []
    for name in KINDS:
        rows = sources.load(name)
        random.Random(seed).shuffle(rows)
        fresh = [q for q in rows if q.id not in seen_ids and q.query.strip().lower() not in seen_text][:n]
        if len(fresh) < n:
            raise SystemExit(f"{name}: only {len(fresh)} unseen queries")
        out += fresh
    assert not {q.id for q in out} & seen_ids
    return out


def label(queries: list[Query], recipe_path: str, out: Path) -> Path:
    """Run the labelling recipe up to the vote on the held-out queries (resumes in OUT/labels/)."""
    from katdata.pipeline import run
    from katdata.recipe import load_recipe
    from katdata.recipe_registry import resolve

    folder = out / "labels"
    folder.mkdir(parents=True, exist_ok=True)
    qpath = out / "heldout_queries.jsonl"
    if not qpath.is_file():
        qpath.write_text("".join(q.model_dump_json() + "\n" for q in queries), "utf-8")
    recipe = load_recipe(resolve(recipe_path), [f"data.path={qpath}", "data.sources=[]", "train=", "eval=",
                                       "previous_round="])
    t0 = time.perf_counter()
    run(recipe, folder, until="tag")
    # the solver's traces change no label (the vote reads the samples only): straight to sampling and the vote
    from katdata.pipeline import Engines
    from katdata.sample import run as sample
    from katdata.vote import run as vote

    engines = Engines(recipe, folder)
    try:
        sample(recipe.sample, folder, engines)
        vote(recipe.vote, folder, engines)
    finally:
        engines.close()
    print(f"labels: {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folder


def items(folder: Path):
    from katdata.evaluate import Item

    def rows(name):
        with open(folder / name, encoding="utf-8") as f:
            return {r["id"]: r for r in map(json.loads, f)}

    queries, tags, votes = rows("queries.jsonl"), rows("tags.jsonl"), rows("votes.jsonl")
    out = []
    for qid, q in queries.items():
        t, v = tags[qid], votes.get(qid) or {}
        if v.get("label") is None:
            continue
        msgs = ([{"role": "system", "content": q["system"]}] if q.get("system") else []) + [
            {"role": "user", "content": q["query"]}]
        out.append(Item(qid, msgs, v["label"], t["difficulty"], str(t["domain"]), str(t["task_type"]), q["kind"],
                        q["reference"], q["query"], q.get("meta") or {}))
    label_sources = {}
    for v in votes.values():
        label_sources[v.get("label_source")] = label_sources.get(v.get("label_source"), 0) + 1
    return out, label_sources


def train_variant(run_dir: Path, sets: list[str], out: Path, resume: Path | None = None) -> tuple[Path, dict]:
    """Train an adapter with the run's train settings plus ``sets`` into ``out``; returns its folder (reused if
    there) and the training stats. ``resume``: a checkpoint of the run's training to continue from (copied in;
    the trainer keeps its step count, so max_steps is the total, and the cosine schedule of the remaining steps
    is that of a run of max_steps from that step on)."""
    import shutil

    from katdata.recipe import load_recipe
    from katdata.train import TrainConfig, run

    base = load_recipe(run_dir / "recipe.yaml").train or TrainConfig()
    slug = "-".join(s.replace("=", "") for s in sets) + (f"-from-{resume.name}" if resume else "")
    cfg = TrainConfig(**{**base.model_dump(), **{k: v for k, v in (_kv(s) for s in sets)},
                         "output": str((out / f"train-bench-{slug}").resolve())})
    if resume and not (Path(cfg.output) / "checkpoints" / resume.name).is_dir():
        shutil.copytree(resume, Path(cfg.output) / "checkpoints" / resume.name)
    t0 = time.perf_counter()
    stats = run(cfg, run_dir)
    print(f"trained {cfg.output}: {stats.get('steps', cfg.max_steps)} steps, loss {stats.get('train_loss')} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return Path(cfg.output) / "adapter", stats


def _kv(item: str):
    import yaml

    key, _, value = item.partition("=")
    return key.strip(), yaml.safe_load(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the quickstart run folder (its queries are excluded)")
    ap.add_argument("--n", type=int, default=16, help="held-out queries per kind (3 kinds)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the held-out draw")
    ap.add_argument("--recipe", default="quickstart", help="the labelling recipe, a file or a packaged name (run up to the vote)")
    ap.add_argument("--out", type=Path, help="bench folder (default RUN/heldout)")
    ap.add_argument("--adapter", type=Path, help="adapter folder (default RUN/train/adapter)")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="train a variant of the run's adapter with this train setting (repeatable)")
    ap.add_argument("--resume-from", type=Path, metavar="CHECKPOINT",
                    help="with --train: continue from this checkpoint of the run's training (e.g. "
                         "RUN/train/checkpoints/checkpoint-48) instead of from step 0")
    ap.add_argument("--max-tokens", type=int, default=256, help="token limit of a reply")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 damps greedy loops (eval's setting)")
    ap.add_argument("--frequency-penalty", type=float, default=0.0, help="eval's frequency_penalty (OpenAI's): "
                    "a token's logit minus this times its count in the reply")
    ap.add_argument("--think-reserve", type=int, help="eval's think_reserve (a decoding-side stop, off by default): "
                    "a think block open after max-tokens - N tokens is closed and the answer gets N tokens")
    ap.add_argument("--forced", action="store_true", help="also answer in forced think-on and think-off")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads while generating")
    ap.add_argument("--labels-only", action="store_true", help="stop after labelling the held-out queries")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = args.out or args.run_dir / "heldout"
    out.mkdir(parents=True, exist_ok=True)
    queries = heldout_queries(args.run_dir, args.n, args.seed)
    its, label_sources = items(label(queries, args.recipe, out))
    if args.labels_only:
        print(f"{len(its)} labelled held-out queries: {label_sources}")
        return 0
    train_stats = {}
    if args.train:
        adapter, train_stats = train_variant(args.run_dir, args.train, out, args.resume_from)
    else:
        adapter = args.adapter or args.run_dir / "train" / "adapter"
        stats_file = adapter.parent / "train.json"
        train_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    steps = train_stats.get("steps")
    if steps and train_stats.get("resumed_from"):  # only the steps after the checkpoint ran here
        steps -= int(str(train_stats["resumed_from"]).rsplit("-", 1)[-1])
    train_figures = {"steps": steps, "seconds": train_stats.get("seconds"), "train_loss": train_stats.get("train_loss"),
                     "seconds_per_step": round(train_stats["seconds"] / steps, 1) if steps and train_stats.get("seconds")
                     else None}
    import torch

    from katdata.backends import EngineConfig, get_backend
    from katdata.evaluate import EvalConfig, generate, metrics
    from katdata.runfiles import RowWriter, done_keys
    from katdata.verify import Verifier

    torch.set_num_threads(args.threads)
    name = f"{adapter.parent.name}-t{args.max_tokens}" + (f"-rp{args.repetition_penalty}"
                                                          if args.repetition_penalty != 1.0 else "") + (
        f"-fp{args.frequency_penalty}" if args.frequency_penalty else "") + (
        f"-close{args.think_reserve}" if args.think_reserve else "")
    gen_path = out / f"{name}.generations.jsonl"
    cfg = EvalConfig(max_tokens=args.max_tokens, chunk=48, repetition_penalty=args.repetition_penalty,
                     frequency_penalty=args.frequency_penalty,
                     think_reserve=args.think_reserve)
    settings = ["auto"] + (["on", "off"] if args.forced else [])
    backend = get_backend("transformers", EngineConfig(model=None, lora_path=str(adapter), batch_size=48))
    t0 = time.perf_counter()
    try:
        with RowWriter(gen_path) as writer:
            done = done_keys(gen_path, key="key")
            generate(backend, "adapted", settings, its, cfg, writer, done, Verifier())
    finally:
        backend.close()
    wanted = {it.id for it in its}
    with open(gen_path, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["id"] in wanted]
    m = metrics(rows)
    auto = [r for r in rows if r["setting"] == "auto"]
    by_kind = {}
    for kind in KINDS:
        sel = [r for r in auto if kind_of(r["id"]) == kind]
        by_kind[kind] = {"n": len(sel), "valid": sum(r["ok"] for r in sel),
                         "agree": sum(r["mode"] == r["label"] for r in sel),
                         "think_on": sum(r["mode"] == "on" for r in sel),
                         "correct": sum(bool(r["correct"]) for r in sel)}
    acc_by_mode = {mode: {"n": len(sel), "accuracy": round(sum(bool(r["correct"]) for r in sel) / len(sel), 4)}
                   for mode in ("on", "off") for sel in [[r for r in auto if r["mode"] == mode]] if sel}
    result = {"adapter": str(adapter), "train_sets": args.train, "train": train_figures, "max_tokens": args.max_tokens,
              "repetition_penalty": args.repetition_penalty, "frequency_penalty": args.frequency_penalty,
              "think_reserve": args.think_reserve,
              "think_closed": m["think_closed"], "n": len(its),
              "label_sources": label_sources,
              "labels": {mode: sum(it.label == mode for it in its) for mode in ("on", "off")},
              # validity counts a reply cut at the token limit as invalid (parse gives it an error)
              "template_validity": m["template_validity"], "truncated": m["truncated"], "malformed": m["malformed"],
              "mode_agreement": m["mode_agreement"], "think_on_rate": m["think_on_rate"],
              "parse_errors": m["parse_errors"], "accuracy_by_chosen_mode": acc_by_mode,
              "settings": m["settings"], "by_kind": by_kind, "gen_seconds": round(time.perf_counter() - t0, 1)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("adapter", "train", "n", "labels", "label_sources", "template_validity",
                                             "truncated", "malformed", "think_closed", "mode_agreement", "think_on_rate",
                                             "parse_errors", "accuracy_by_chosen_mode", "by_kind")}, indent=1))
    for s, v in m["settings"].items():
        print(f"{s}: accuracy {v['accuracy']} valid {v['valid']} mean tokens {v['mean_tokens']}")
    print(f"wrote {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The dataset card of an export: a YAML header for the Hub and a body built from the run.

`CardStats` is filled row by row while the export streams (counters only, so memory stays flat);
`write_card` adds what the other run files say (summary.json, recipe.yaml, rejects.jsonl, the
vote and solver attempts), draws the think-on share by difficulty, and writes README.md.
Missing optional files are noted in the card; corrupt ones raise InputError with file and line.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from katdata.errors import InputError
from katdata.records import Attempt, KatRecord
from katdata.runfiles import read_rows

PLOT = "think_on_by_difficulty.png"
BY = ("domain", "difficulty", "task_type", "kind", "source")
# Licences of the packaged sources (../shared/datasets.md), keyed by the source names katdata uses.
SOURCE_LICENSES = {"gsm8k": "MIT", "aime2025": "MIT", "humaneval": "MIT", "fanoutqa-hop": "CC-BY-SA-4.0",
                   "fanoutqa-multihop": "CC-BY-SA-4.0"}
SECRET = re.compile(r"key|token|secret|password", re.I)


class CardStats:
    """Counters over the exported records, filled one record at a time."""

    def __init__(self) -> None:
        self.n = 0
        self.splits: Counter = Counter()
        self.modes: Counter = Counter()
        self.by: dict[str, dict[str, Counter]] = {k: defaultdict(Counter) for k in BY}
        self.margins: Counter = Counter()  # margin rounded to 0.1
        self.margin_sum, self.voted = 0.0, 0
        self.p_sum = {"on": 0.0, "off": 0.0}
        self.explored, self.flagged, self.reviewed = 0, 0, 0
        self.changed_fields: Counter = Counter()
        self.models: Counter = Counter()
        self.chars = {"on": 0, "off": 0}
        self.languages: Counter = Counter()
        self.plotted = False

    def add(self, rec: KatRecord, split: str) -> None:
        self.n += 1
        self.splits[split] += 1
        self.modes[rec.mode] += 1
        self.chars[rec.mode] += len(rec.response)
        keys = {"domain": rec.tags.get("domain"), "difficulty": rec.tags.get("difficulty"),
                "task_type": rec.tags.get("task_type"), "kind": rec.kind,
                "source": rec.provenance.get("source")}
        for k, v in keys.items():
            self.by[k][str(v) if v is not None else "-"][rec.mode] += 1
        if isinstance(rec.tags.get("language"), str):
            self.languages[rec.tags["language"]] += 1
        v = rec.vote
        if isinstance(v.get("margin"), (int, float)):
            self.voted += 1
            self.margin_sum += v["margin"]
            self.margins[round(v["margin"], 1)] += 1
            for m in ("on", "off"):
                self.p_sum[m] += float(v.get(f"p_{m}") or 0.0)
        self.explored += bool(v.get("explored"))
        self.flagged += bool(v.get("review"))
        if rec.changes:
            self.reviewed += 1
            self.changed_fields.update({c.field for c in rec.changes})
        models = rec.provenance.get("models")
        if isinstance(models, dict):
            self.models.update((str(r), str(m)) for r, m in models.items())


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if SECRET.search(str(k)) and v else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"broken JSON ({exc.msg})", line=exc.lineno) from exc


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(path, f"broken YAML ({getattr(exc, 'problem', exc)})",
                         line=mark.line + 1 if mark else None) from exc


def attempt_stats(path: Path) -> dict[str, dict[str, int]]:
    """Per mode: attempts, parsed, verified, passed, truncated (from solve.jsonl or samples.jsonl)."""
    out: dict[str, dict[str, int]] = defaultdict(Counter)
    for a in read_rows(path, Attempt):
        c = out[a.mode]
        c["attempts"] += 1
        c["parsed"] += a.ok
        c["verified"] += a.correct is not None
        c["passed"] += a.correct is True
        c["truncated"] += a.finish_reason == "length" or "truncated" in a.errors
    return out


def reject_stats(path: Path) -> Counter:
    out: Counter = Counter()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(path, f"broken JSON ({exc})", line=n) from exc
            if not isinstance(row, dict):
                raise InputError(path, "not a JSON object", line=n)
            out[(str(row.get("stage", "-")), str(row.get("reason", "-")))] += 1
    return out


def plot(stats: CardStats, path: Path) -> bool:
    """Bar chart of the think-on share per difficulty level; False when no record has a difficulty."""
    from matplotlib.figure import Figure

    levels = sorted((k for k in stats.by["difficulty"] if k != "-"), key=lambda k: (len(k), k))
    if not levels:
        return False
    counts = [stats.by["difficulty"][k] for k in levels]
    share = [c["on"] / max(1, c["on"] + c["off"]) for c in counts]
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot()
    bars = ax.bar(levels, share, color="#4c72b0")
    for bar, c in zip(bars, counts):
        ax.annotate(f"n={c['on'] + c['off']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("difficulty (tagger, 1-5)")
    ax.set_ylabel("think-on share")
    ax.set_title("Think-on share by difficulty")
    fig.tight_layout()
    fig.savefig(path)
    return True


def header(stats: CardStats, splits: dict, feats, cfg) -> dict:
    langs = sorted(k for k in stats.languages if re.fullmatch(r"[a-z]{2,3}", k))
    head: dict[str, Any] = {"license": cfg.license}
    if langs:
        head["language"] = langs
    head |= {
        "pretty_name": cfg.pretty_name, "task_categories": ["text-generation"],
        "tags": ["adaptive-thinking", "autothink", "kat", "reasoning", "sft", "katdata"],
        "size_categories": [size_category(stats.n)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": v["pattern"]} for s, v in splits.items()]}],
        "dataset_info": {"features": feats._to_yaml_list(),
                         "splits": [{"name": s, "num_bytes": v["bytes"], "num_examples": v["rows"]}
                                    for s, v in splits.items()]},
    }
    return {k: v for k, v in head.items() if v is not None}


def body(run_dir: Path, src: Path, stats: CardStats, splits: dict, cfg) -> str:
    """The card's markdown body, from the run's records and files."""
    on, off, n = stats.modes["on"], stats.modes["off"], stats.n
    out = [f"# {cfg.pretty_name}", "",
           "Adaptive-thinking (KAT / AutoThink style) supervised fine-tuning data built with katdata. Each "
           "assistant response first judges the query (`<judge>`), then either answers directly "
           "(`<think_off>`) or reasons first (`<think_on>` + `<think>`), then gives `<answer>`. The "
           "`messages` column is ready for chat SFT; `vote` holds the evidence behind each mode label and "
           "`provenance` the models, roles and human review changes.", "",
           f"Built from `{src.relative_to(run_dir) if src.is_relative_to(run_dir) else src}` of run "
           f"`{run_dir.name}`; layout `{cfg.format}`; split seed {cfg.seed}, test share {cfg.test_size} "
           "stratified by mode and domain.", "",
           "```python\nfrom datasets import load_dataset\nds = load_dataset(\"PATH_OR_REPO\")\n```", "",
           "## Counts", "", _table(["split", "rows", "files"], [[s, v["rows"], v["files"]] for s, v in splits.items()]),
           "", f"Mode ratio overall: think-on {on} ({_pct(on, n)}), think-off {off} ({_pct(off, n)}). "
           f"Mean response length: think-on {stats.chars['on'] // max(on, 1)} chars, "
           f"think-off {stats.chars['off'] // max(off, 1)} chars.", ""]
    for key in BY:
        groups = stats.by[key]
        if set(groups) == {"-"}:
            continue
        rows = [[g, c["on"] + c["off"], c["on"], c["off"], _pct(c["on"], c["on"] + c["off"])]
                for g, c in sorted(groups.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))]
        out += [f"### Mode ratio by {key}", "", _table([key, "rows", "think-on", "think-off", "on share"], rows), ""]
    if stats.plotted:
        out += [f"![Think-on share by difficulty]({PLOT})", ""]
    out += ["## Vote evidence", ""]
    if stats.voted:
        out += [f"{stats.voted} records carry a vote. Mean margin (think-on minus think-off pass rate) "
                f"{stats.margin_sum / stats.voted:+.3f}; mean pass rate of the sampled responses: think-on "
                f"{stats.p_sum['on'] / stats.voted:.3f}, think-off {stats.p_sum['off'] / stats.voted:.3f}. "
                f"Exploration (random mode): {stats.explored}; flagged for review: {stats.flagged}.", "",
                _table(["margin", "records"], [[f"{m:+.1f}", c] for m, c in sorted(stats.margins.items())]), ""]
    else:
        out += ["No record carries a vote margin.", ""]
    out += _run_files(run_dir, stats)
    out += _sources(stats, cfg)
    return "\n".join(out).rstrip() + "\n"


def _run_files(run_dir: Path, stats: CardStats) -> list[str]:
    out = ["## Verifier pass rates and truncation", ""]
    rows = []
    for name in ("samples.jsonl", "solve.jsonl"):
        if (run_dir / name).is_file():
            for mode, c in sorted(attempt_stats(run_dir / name).items()):
                rows.append([name, mode, c["attempts"], _pct(c["parsed"], c["attempts"]), c["verified"],
                             _pct(c["passed"], c["verified"]), _pct(c["truncated"], c["attempts"])])
    out += [_table(["file", "mode", "attempts", "parsed", "verified", "pass rate", "truncated"], rows)
            if rows else "No attempt files (samples.jsonl, solve.jsonl) in the run folder.", ""]
    out += ["## Rejects", ""]
    if (run_dir / "rejects.jsonl").is_file():
        rej = reject_stats(run_dir / "rejects.jsonl")
        total = sum(rej.values())
        out += [f"{total} rows rejected along the way ({_pct(total, total + stats.n)} of exported + rejected).", "",
                _table(["stage", "reason", "rows"], [[s, r, c] for (s, r), c in rej.most_common()]), ""]
    else:
        out += ["No rejects.jsonl in the run folder.", ""]
    out += ["## Models per role", ""]
    recipe = read_yaml(run_dir / "recipe.yaml") if (run_dir / "recipe.yaml").is_file() else None
    if stats.models:
        out += [_table(["role", "model", "records"], [[r, m, c] for (r, m), c in sorted(stats.models.items())]), ""]
    engines = recipe.get("engines") if isinstance(recipe, dict) else None
    if isinstance(engines, dict):
        out += [_table(["engine", "settings"], [[k, ", ".join(f"{a}={b}" for a, b in (v or {}).items()
                                                              if not SECRET.search(str(a)))
                                                 if isinstance(v, dict) else v] for k, v in engines.items()]), ""]
    if not stats.models and not isinstance(engines, dict):
        out += ["No model information (no provenance.models in the records, no engines in recipe.yaml).", ""]
    if stats.reviewed:
        fields = ", ".join(f"{f} ({c})" for f, c in stats.changed_fields.most_common())
        out += ["## Human review", "", f"{stats.reviewed} records changed in review; fields: {fields}.", ""]
    out += ["## Recipe", ""]
    out += (["<details><summary>recipe.yaml (secrets redacted)</summary>", "", "```yaml",
             yaml.safe_dump(_redact(recipe), sort_keys=False).rstrip(), "```", "", "</details>", ""]
            if recipe is not None else ["No recipe.yaml in the run folder.", ""])
    if (run_dir / "summary.json").is_file():
        summary = read_json(run_dir / "summary.json")
        out += ["<details><summary>summary.json (stage statistics)</summary>", "", "```json",
                json.dumps(_redact(summary), indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    return out


def _sources(stats: CardStats, cfg) -> list[str]:
    out = ["## Licence", "", f"Card licence: `{cfg.license}`."]
    srcs = [s for s in stats.by["source"] if s != "-"]
    if srcs:
        out += ["The queries come from these sources; their licences apply to the query text:", "",
                _table(["source", "licence"], [[s, SOURCE_LICENSES.get(s, "unknown")] for s in sorted(srcs)])]
    return out + [""]


def write_card(folder: Path, run_dir: Path, src: Path, stats: CardStats, splits: dict, feats, cfg) -> Path:
    """Write README.md (and the plot) into the export folder."""
    if cfg.pretty_name is None:
        cfg = cfg.model_copy(update={"pretty_name": f"katdata {Path(run_dir).resolve().name}"})
    stats.plotted = cfg.plot and plot(stats, folder / PLOT)
    head = yaml.safe_dump(header(stats, splits, feats, cfg), sort_keys=False, allow_unicode=True)
    text = f"---\n{head}---\n\n{body(Path(run_dir), src, stats, splits, cfg)}"
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path

"""What an export is: its layouts (explicit Features; hf, trl, llamafactory), its Hub card.

The tags and vote dicts become typed structs; keys or values that do not fit are kept, JSON-encoded,
in the struct's ``extra`` field. `CardStats` counts each batch while the export streams (counters
only, so memory stays flat); `write_card` adds what the other run files say (summary.json,
rejects.jsonl, queries.jsonl, the vote and solver attempts) and the recipe the export ran under, draws the think-on share
by difficulty, and writes README.md. Missing optional files are noted in the card; corrupt ones
raise InputError with file and line.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import pydantic_core
import yaml

from katdata import balance, card_training
from katdata.card_stats import BY, CardStats  # noqa: F401  (CardStats re-exported: the card's counters)
from katdata.errors import InputError, require
from katdata.records import Attempt, Change, KatRecord
from katdata.redact import redact
from katdata.runfiles import read_rows
from katdata.decontaminate import card_lines
from katdata.sources import licence as source_licence  # the one table of packaged sources
from katdata.run_folder import RunFolder

PLOT = "think_on_by_difficulty.png"


TAG_TYPES = {"domain": "string", "task_type": "string", "difficulty": "int32", "needs_reasoning": "bool",
             "p_reasoning": "float64", "verifiability": "string", "language": "string",
             "think_off_candidate": "bool", "source": "string"}
VOTE_TYPES = {"label": "string", "reason": "string", "explored": "bool", "n_on": "int32", "n_off": "int32",
              "p_on": "float64", "p_off": "float64", "margin": "float64", "delta": "float64",
              "entropy_on": "float64", "entropy_off": "float64", "tokens_on": "float64", "tokens_off": "float64",
              "samples_used": "int32", "samples_saved": "int32", "chosen_index": "int32",
              "chosen_source": "string", "review": "bool", "label_source": "string"}
COLUMN_TYPES = {"string": (str,), "bool": (bool,), "int32": (int,), "float64": (int, float)}


def features(fmt: str = "hf"):
    """The explicit datasets.Features of each export format."""
    ds = require("datasets", "local")
    V, L = ds.Value, ds.List
    msg = L({"role": V("string"), "content": V("string")})
    if fmt == "trl":
        return ds.Features({"id": V("string"), "prompt": msg, "completion": msg, "mode": V("string")})
    if fmt == "llamafactory":
        return ds.Features({"id": V("string"), "messages": msg, "mode": V("string")})
    change = {"field": V("string"), "old": V("string"), "new": V("string"), "annotator": V("string"), "at": V("string")}
    return ds.Features({
        "id": V("string"), "query": V("string"), "system": V("string"), "messages": msg,
        "response": V("string"), "mode": V("string"), "judge": V("string"), "think": V("string"),
        "answer": V("string"), "reference": V("string"), "kind": V("string"),
        "label_source": V("string"), "content_source": V("string"),
        "tags": {**{k: V(t) for k, t in TAG_TYPES.items()}, "extra": V("string")},
        "vote": {**{k: V(t) for k, t in VOTE_TYPES.items()}, "extra": V("string")},
        "provenance": {"source": V("string"), "models": L({"role": V("string"), "model": V("string")}),
                       "changes": L(change), "extra": V("string")},
    })


def _fits(value: Any, dtype: str) -> bool:
    """Whether a value goes in a typed column (exact types: a bool is no int here; an int in a float column only
    where a float holds it exactly, as Arrow requires)."""
    if value is None:
        return True
    if type(value) not in COLUMN_TYPES[dtype]:
        return False
    if dtype == "int32":
        return -2**31 <= value < 2**31
    return dtype != "float64" or type(value) is float or -2**53 <= value <= 2**53


def dumps(value: Any) -> str:
    """Compact JSON (pydantic-core: several times faster than json.dumps)."""
    return pydantic_core.to_json(value).decode()


def typed(d: dict, types: dict[str, str]) -> dict:
    """A dict as a struct: the typed keys in their columns, anything else JSON-encoded in ``extra``."""
    out: dict[str, Any] = dict.fromkeys(types)
    extra = None
    for k, v in d.items():
        t = types.get(k)
        if t is not None and _fits(v, t):
            out[k] = v
        else:
            extra = extra or {}
            extra[k] = v
    out["extra"] = dumps(extra) if extra else None
    return out


def untyped(s: dict) -> dict:
    """The dict back from a typed struct (keys whose value was null are left out)."""
    out = {k: v for k, v in s.items() if k != "extra" and v is not None}
    return out | (json.loads(s["extra"]) if s.get("extra") else {})


def from_hf_row(row: dict) -> KatRecord:
    """The KatRecord back from a row of the hf layout (lossless up to null-valued keys in tags/vote)."""
    p = row["provenance"]
    prov = json.loads(p["extra"]) if p.get("extra") else {}
    if p.get("source") is not None:
        prov["source"] = p["source"]
    if p["models"]:
        prov["models"] = {m["role"]: m["model"] for m in p["models"]}
    changes = [Change(field=c["field"], old=json.loads(c["old"]), new=json.loads(c["new"]),
                      annotator=c["annotator"], at=c["at"]) for c in p["changes"]]
    keep = ("id", "query", "system", "mode", "judge", "think", "answer", "response", "reference", "kind",
            "label_source", "content_source")
    return KatRecord(**{k: row[k] for k in keep}, tags=untyped(row["tags"]), vote=untyped(row["vote"]),
                     provenance=prov, changes=changes)


def view(table, fmt: str, schema):
    """The hf table in another layout: trl (prompt/completion chat lists) or llamafactory (messages)."""
    import numpy as np
    import pyarrow as pa

    if fmt == "hf":
        return table
    msgs = table.column("messages").combine_chunks()
    if fmt == "llamafactory":
        return pa.Table.from_arrays([table.column("id"), msgs, table.column("mode")], schema=schema)
    offs = msgs.offsets.to_numpy().astype(np.int64)
    offs, values, n = offs - offs[0], msgs.flatten(), len(msgs)
    last = offs[1:] - 1
    keep = np.ones(len(values), dtype=bool)
    keep[last] = False
    typ = schema.field("prompt").type
    prompt = pa.ListArray.from_arrays(pa.array((offs - np.arange(n + 1)).astype(np.int32)),
                                      values.filter(pa.array(keep)), type=typ)
    completion = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values.take(pa.array(last)),
                                          type=typ)
    return pa.Table.from_arrays([table.column("id"), prompt, completion, table.column("mode")], schema=schema)


def llamafactory_info(tmp: Path, splits: dict) -> None:
    """dataset_info.json: how LLaMA-Factory reads each split folder (sharegpt layout, OpenAI-style roles)."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {f"katdata_{s}": {"file_name": f"data/{s}", "formatting": "sharegpt",
                             "columns": {"messages": "messages"}, "tags": tags} for s in splits}
    (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"broken JSON ({exc.msg})", line=exc.lineno) from exc


def attempt_stats(path: Path, models: Counter) -> dict[str, dict[str, int]]:
    """Per mode: attempts, parsed, verified, passed, truncated (solve.jsonl or samples.jsonl); counts
    the (role, model) of the attempts' agent segments into ``models``."""
    out: dict[str, dict[str, int]] = defaultdict(Counter)
    for a in read_rows(path, Attempt):
        c = out[a.mode]
        c["attempts"] += 1
        c["parsed"] += a.ok
        c["verified"] += a.correct is not None
        c["passed"] += a.correct is True
        c["truncated"] += a.finish_reason == "length" or "truncated" in a.errors
        models.update((s.role, s.model) for s in a.segments if s.model)
    return out


def recipe_roles(recipe: Any) -> list[list[str]]:
    """(role, engine, backend, model) for every ``*engine`` setting of every recipe section."""
    if not isinstance(recipe, dict):
        return []
    engines = recipe.get("engines") if isinstance(recipe.get("engines"), dict) else {}
    rows = []
    for section, body in recipe.items():
        for key, name in (body.items() if isinstance(body, dict) and section != "engines" else ()):
            if (key == "engine" or key.endswith("_engine")) and isinstance(name, str):
                used = name if name in engines else "default"
                e = engines.get(used) if isinstance(engines.get(used), dict) else {}
                rows.append([section if key == "engine" else f"{section} ({key[:-7]})",
                             name if used == name else f"{name} -> default",
                             e.get("backend", "transformers"), e.get("model") or "embedded (SmolLM2-135M-Instruct)"])
    return rows


def count_json(path: Path, key) -> Counter:
    """Count ``key(row)`` over a JSONL file of objects; a bad line raises InputError with its number."""
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
            out[key(row)] += 1
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


def _order(key: str):
    """Difficulty levels in their own order; other tags by size."""
    if key == "difficulty":
        return lambda kv: (len(kv[0]), kv[0])
    return lambda kv: (-sum(kv[1].values()), kv[0])


def body(run_dir: Path, src: Path, stats: CardStats, splits: dict, cfg, recipe: Optional[dict] = None) -> str:
    """The card's markdown body, from the run's records and files and the recipe it ran under (None: unknown)."""
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
           f"```python\nfrom datasets import load_dataset\nds = load_dataset(\"{cfg.push_to_hub or 'path/to/export'}\")\n```", "",
           *card_training.section(cfg.format, cfg.push_to_hub or "path/to/export"),
           "## Counts", "", *balance.card_lines(run_dir, stats.modes, stats.label_sources, stats.content_sources),
           _table(["split", "rows", "files"], [[s, v["rows"], v["files"]] for s, v in splits.items()]),
           "", f"Mode ratio overall: think-on {on} ({_pct(on, n)}), think-off {off} ({_pct(off, n)}). "
           f"Mean response length: think-on {stats.chars['on'] // max(on, 1)} chars, "
           f"think-off {stats.chars['off'] // max(off, 1)} chars.", ""]
    summary = read_json(RunFolder(run_dir).summary) if (RunFolder(run_dir).summary).is_file() else {}
    if any(isinstance(st, dict) and st.get("sandbox") == "unisolated" for st in summary.get("stages", {}).values()):
        out += ["> **Warning:** model-written code was verified WITHOUT isolation (`sandbox.allow_unisolated: true`): "
                "it could reach the network and the files of the machine that built this data.", ""]
    for key in BY:
        groups = stats.by[key]
        if set(groups) == {"-"}:
            continue
        rows = [[g, c["on"] + c["off"], c["on"], c["off"], _pct(c["on"], c["on"] + c["off"])]
                for g, c in sorted(groups.items(), key=_order(key))]
        out += [f"### Mode ratio by {key}", "", _table([key, "rows", "think-on", "think-off", "on share"], rows), ""]
    if stats.plotted:
        out += [f"![Think-on share by difficulty]({PLOT})", ""]
    out += ["## Vote evidence", ""]
    if stats.voted:
        p = {m: f"{stats.p_sum[m] / stats.p_n[m]:.3f}" if stats.p_n[m] else "-" for m in ("on", "off")}
        out += [f"{stats.voted} records carry a vote. Mean vote margin (as the vote stage recorded it) "
                f"{stats.margin_sum / stats.voted:+.3f}; mean pass rate of the sampled responses per record: "
                f"think-on {p['on']}, think-off {p['off']}. "
                f"Exploration (random mode): {stats.explored}; flagged for review: {stats.flagged}.", "",
                _table(["margin", "records"], [[f"{m:+.1f}", c] for m, c in sorted(stats.margins.items())]), ""]
    else:
        out += ["No record carries a vote margin.", ""]
    from katdata.calibrate import card_lines  # the tagger fitted to the vote (calibration.json), when there is one
    out += card_lines(run_dir)
    from katdata.benchmarks import card_section  # eval's benchmarks, when export runs after eval
    out += card_section(run_dir)
    out += _run_files(run_dir, stats, recipe)
    out += _sources(run_dir, stats, cfg)
    return "\n".join(out).rstrip() + "\n"


def _run_files(run_dir: Path, stats: CardStats, recipe: Optional[dict]) -> list[str]:
    out = ["## Verifier pass rates and truncation", ""]
    rows, seg_models = [], Counter()
    for path in (RunFolder(run_dir).samples, RunFolder(run_dir).solve):
        if path.is_file():
            for mode, c in sorted(attempt_stats(path, seg_models).items()):
                rows.append([path.name, mode, c["attempts"], _pct(c["parsed"], c["attempts"]), c["verified"],
                             _pct(c["passed"], c["verified"]), _pct(c["truncated"], c["attempts"])])
    out += [_table(["file", "mode", "attempts", "parsed", "verified", "pass rate", "truncated"], rows)
            if rows else "No attempt files (samples.jsonl, solve.jsonl) in the run folder.", ""]
    out += ["## Rejects", ""]
    if (RunFolder(run_dir).rejects).is_file():
        rej = count_json(RunFolder(run_dir).rejects, lambda r: (str(r.get("stage", "-")), str(r.get("reason", "-"))))
        total = sum(rej.values())
        out += [f"{total} rows rejected along the way ({_pct(total, total + stats.n)} of exported + rejected).", "",
                _table(["stage", "reason", "rows"], [[s, r, c] for (s, r), c in rej.most_common()]), ""]
    else:
        out += ["No rejects.jsonl in the run folder.", ""]
    out += ["## Models per role", ""]
    roles = recipe_roles(recipe)
    if roles:
        out += ["From recipe.yaml:", "", _table(["role", "engine", "backend", "model"], roles), ""]
    if seg_models:
        out += ["From the solver's agent segments:", "",
                _table(["role", "model", "segments"], [[r, m, c] for (r, m), c in sorted(seg_models.items())]), ""]
    if stats.models:
        out += ["From the records' provenance:", "",
                _table(["role", "model", "records"], [[r, m, c] for (r, m), c in sorted(stats.models.items())]), ""]
    if not (roles or seg_models or stats.models):
        out += ["No model information (no recipe, agent segments or provenance.models).", ""]
    out += ["## Human review", ""] if stats.reviewed or stats.review_note else []
    if stats.reviewed:
        fields = ", ".join(f"{f} ({c})" for f, c in stats.changed_fields.most_common())
        out += [f"{stats.reviewed} records changed in review; changes per field: {fields}.", ""]
    out += [stats.review_note, ""] if stats.review_note else []  # held back for review, or included unreviewed
    out += ["## Recipe", ""]
    out += (["<details><summary>recipe.yaml (secrets redacted)</summary>", "", "```yaml",
             yaml.safe_dump(redact(recipe), sort_keys=False).rstrip(), "```", "", "</details>", ""]
            if recipe is not None else ["No recipe: these records were exported without one.", ""])
    if (RunFolder(run_dir).summary).is_file():
        summary = {k: v for k, v in read_json(RunFolder(run_dir).summary).items() if k != "fingerprints"}
        out += ["<details><summary>summary.json (stage statistics)</summary>", "", "```json",
                json.dumps(redact(summary), indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    return out


def _sources(run_dir: Path, stats: CardStats, cfg) -> list[str]:
    out = ["## Licence", "", f"Card licence: `{cfg.license}`.", ""]
    queries = RunFolder(run_dir).queries
    srcs = count_json(queries, lambda r: str(r.get("source") or "-")) if queries.is_file() else Counter()
    for s in stats.by["source"]:
        srcs[s] += 0
    srcs.pop("-", None)
    if srcs:
        out += ["The queries come from these sources (queries.jsonl); their licences apply to the query text:", "",
                _table(["source", "queries", "licence"], [[s, c or "-", source_licence(s)]
                                                          for s, c in sorted(srcs.items())]), ""]
    stages = read_json(RunFolder(run_dir).summary).get("stages", {}) if (RunFolder(run_dir).summary).is_file() else {}
    return out + card_lines(stages.get("decontaminate"), srcs)


def write_card(folder: Path, run_dir: Path, src: Path, stats: CardStats, splits: dict, feats, cfg,
               recipe: Optional[dict] = None) -> Path:
    """Write README.md, chat_template.jinja (and the plot) into the export folder; ``recipe``: the resolved recipe
    (secrets redacted, as recipe.yaml holds it) the export ran under, shown in the card."""
    if cfg.pretty_name is None:
        cfg = cfg.model_copy(update={"pretty_name": f"katdata {Path(run_dir).resolve().name}"})
    stats.finish()
    stats.plotted = cfg.plot and plot(stats, folder / PLOT)
    card_training.write_template(folder)  # chat_template.jinja, which the card's "Train on this" uses
    from katdata.calibrate import copy_plot
    copy_plot(run_dir, folder)  # the tagger's reliability plot, which card_lines shows
    from katdata import benchmarks
    benchmarks.copy_plot(run_dir, folder)
    head = yaml.safe_dump(header(stats, splits, feats, cfg), sort_keys=False, allow_unicode=True)
    text = f"---\n{head}---\n\n{body(Path(run_dir), src, stats, splits, cfg, recipe)}"
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path

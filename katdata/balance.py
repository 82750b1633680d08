"""No silent mode collapse: the vote's label shares against the records assembly kept, per mode.

A weak engine can label queries think-on (from the tagger prior) yet write no think-on content, so
assembly rejects every one of them and the export holds one mode only. `check_balance` runs at the
end of the assemble stage, before anything is exported: when a labelled mode lost more than
``assemble.max_mode_loss`` of its queries, or makes up less than ``assemble.min_mode_share`` of the
records, it stops the run with the counts, the reject reasons and the remedies, unless
``assemble.accept_imbalance`` is set (then the stats carry the message and the card records it).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import msgspec
from msgspec import UNSET

from katdata import fast_rows
from katdata.errors import InputError, KatdataError
from katdata.run_folder import RunFolder
from katdata.runfiles import loads

log = logging.getLogger(__name__)

MODES = ("on", "off")
NAMES = {"on": "think-on", "off": "think-off"}
LABEL_NAMES = {"vote": "vote", "prior": "tagger prior", "exploration": "exploration", "human": "human"}
CONTENT_NAMES = {"sample": "model sample", "solver": "solver team", "reference": "reference"}


def _json_rows(path: Path, fields: tuple[str, ...]):
    """The rows of a JSONL file read for ``fields`` alone (an absent one: msgspec.UNSET; msgspec skips the rest, the
    long texts of records.jsonl among them); broken JSON raises InputError with the line."""
    if not path.is_file():
        return
    light = msgspec.json.Decoder(fast_rows.fields(fields))
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    if not raw.isascii():
                        raw.decode("utf-8")  # msgspec does not look into the strings it skips
                    yield light.decode(raw)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    try:  # what msgspec refuses, json as before: it reads NaN and a lone surrogate, names the rest
                        row = loads(raw)
                    except ValueError as exc:
                        raise InputError(path, f"broken JSON ({exc})", line=n) from exc
                    yield SimpleNamespace(**{k: row.get(k, UNSET) if isinstance(row, dict) else UNSET for k in fields})


def _get(value, default=None):
    """A field of a `_json_rows` row as ``dict.get`` gives it: ``default`` where the key is absent."""
    return default if value is UNSET else value


def counts(run_dir: Path) -> dict:
    """Labels per mode and their sources (votes.jsonl), records per mode with their label and content
    sources (records.jsonl), and per labelled mode the reject reasons of the queries it lost (rejects.jsonl)."""
    run_dir = Path(run_dir)
    labels, label_of, vote_sources = Counter(), {}, Counter()
    for v in _json_rows(RunFolder(run_dir).votes, ("id", "label", "label_source")):
        if v.label in MODES:
            labels[v.label] += 1
            label_of[v.id] = v.label
            vote_sources[_get(v.label_source) or "-"] += 1
    records, label_sources, content_sources = Counter(), Counter(), Counter()
    for r in _json_rows(RunFolder(run_dir).records, ("mode", "label_source", "content_source", "provenance")):
        records[r.mode] += 1
        label_sources[_get(r.label_source) or "-"] += 1
        content_sources[_get(r.content_source) or (_get(r.provenance) or {}).get("content_source") or "-"] += 1
    lost: dict[str, Counter] = defaultdict(Counter)
    for r in _json_rows(RunFolder(run_dir).rejects, ("id", "stage", "reason")):
        mode = label_of.get(_get(r.id))
        if mode:
            lost[mode][f"{_get(r.stage, '-')}: {str(_get(r.reason, '-')).split(':')[0]}"] += 1
    return {"labels": {m: labels[m] for m in MODES}, "records_by_mode": {m: records[m] for m in MODES},
            "vote_label_sources": dict(vote_sources), "label_sources": dict(label_sources),
            "content_sources": dict(content_sources), "lost": {m: dict(lost[m]) for m in MODES if lost[m]}}


def problems(c: dict, max_loss: float, min_share: float) -> dict[str, str]:
    """{mode: one sentence} per collapsed mode; empty when both modes kept enough of their labels."""
    total = sum(c["records_by_mode"].values())
    out = {}
    for m in MODES:
        n_lab, n_rec = c["labels"][m], c["records_by_mode"][m]
        if not n_lab:
            continue
        loss, share = 1 - n_rec / n_lab, n_rec / total if total else 0.0
        why = []
        if loss > max_loss + 1e-12:
            why.append(f"lost {loss:.0%} of them, over assemble.max_mode_loss {max_loss}")
        if share < min_share - 1e-12:
            why.append(f"{NAMES[m]} is {share:.0%} of the {total} records, under assemble.min_mode_share {min_share}")
        if why:
            reasons = ", ".join(f"{r} {k}" for r, k in sorted(c["lost"].get(m, {}).items(), key=lambda kv: -kv[1]))
            out[m] = (f"the vote labelled {n_lab} queries {NAMES[m]}, assembly kept {n_rec} ({'; '.join(why)})"
                      + (f"; lost by reject reason: {reasons}" if reasons else ""))
    return out


REMEDIES = {
    "on": "a stronger engine for the solve and sample roles (solve.solver_engine, solve.thinker_engine, "
          "sample.engine), worked solutions in the input's `solution` column with assemble.reference_fallback: true",
    "off": "a stronger engine for the sample role (sample.engine), reference answers with "
           "assemble.reference_fallback: true",
}


def message(c: dict, found: dict[str, str]) -> str:
    """One paragraph: what collapsed, counts and reject reasons, who labelled, and the remedies."""
    fixes = "; ".join(REMEDIES[m] for m in found)
    return (f"assemble: mode collapse: {'. '.join(found.values())} "
            f"(labels from: {share_line(c['vote_label_sources'], LABEL_NAMES)}). Remedies: {fixes}; "
            "or rerun with --from assemble --set assemble.accept_imbalance=true to export as is (the dataset card "
            "records it). After a change "
            "of engine or input, rerun with --from solve (or --from load).")


def check_balance(cfg, run_dir: Path) -> dict:
    """The label/record counts for summary.json; raises KatdataError on a mode collapse unless the recipe
    accepts the imbalance (``cfg``: the assemble stage's config)."""
    c = counts(run_dir)
    stats = {k: c[k] for k in ("labels", "records_by_mode", "label_sources", "content_sources")}
    found = problems(c, cfg.max_mode_loss, cfg.min_mode_share)
    if found:
        msg = message(c, found)
        if not cfg.accept_imbalance:
            raise KatdataError(msg + " Nothing was exported; records.jsonl and rejects.jsonl are kept.")
        log.warning("%s (accepted: assemble.accept_imbalance)", msg)
        stats["imbalance_accepted"] = msg
    return stats


def share_line(counter: dict, names: dict) -> str:
    """ "1 vote, 35 tagger prior" from {"vote": 1, "prior": 35}, largest first."""
    return ", ".join(f"{v} {names.get(k, 'not recorded' if k == '-' else k)}"
                     for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def mode_line(labels: dict, exported: dict) -> str:
    """Label shares (vote) next to exported shares, per mode."""
    n_lab, n_exp = sum(labels.values()), sum(exported.values())
    pct = lambda a, b: f"{100 * a / b:.0f}%" if b else "-"  # noqa: E731
    return "; ".join(f"{NAMES[m]} {labels.get(m, 0)} labelled ({pct(labels.get(m, 0), n_lab)}) -> "
                     f"{exported.get(m, 0)} exported ({pct(exported.get(m, 0), n_exp)})" for m in MODES)


def card_lines(run_dir: Path, exported: dict, label_sources: dict, content_sources: dict) -> list[str]:
    """The card's opening statistics: who labelled, where the content came from, label vs exported shares."""
    run_dir = Path(run_dir)
    out = [f"Labels of the exported records: {share_line(label_sources, LABEL_NAMES)}. "
           f"Their content: {share_line(content_sources, CONTENT_NAMES)}.", ""]
    if (RunFolder(run_dir).votes).is_file():
        labels, sources = Counter(), Counter()
        for v in _json_rows(RunFolder(run_dir).votes, ("label", "label_source")):
            if v.label in MODES:
                labels[v.label] += 1
                sources[_get(v.label_source) or "-"] += 1
        out += [f"Mode shares, vote labels -> exported records: {mode_line(labels, exported)}. "
                f"All labels of the vote stage: {share_line(sources, LABEL_NAMES)}.", ""]
    summary = RunFolder(run_dir).summary
    if summary.is_file():
        try:
            accepted = json.loads(summary.read_text("utf-8"))["stages"].get("assemble", {}).get("imbalance_accepted")
        except (ValueError, KeyError, AttributeError):
            accepted = None
        if accepted:
            out += [f"**Imbalance accepted** (assemble.accept_imbalance: true): {accepted}", ""]
    return out

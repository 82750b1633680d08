"""Human review in Argilla: push the records that need a human, pull the answers, merge them.

    katdata review push RUN_DIR [--recipe R] [--all]   -> Argilla dataset katdata-<run>-v<N>
    katdata review pull RUN_DIR [--recipe R]           -> RUN_DIR/review/merged.jsonl, changes.jsonl

The dataset layout (fields, questions, metadata) lives in ``annotation/dataset.yaml`` and the
reviewer guidelines in ``annotation/guidelines.md``. Records are logged under their own id, so a
second push updates them in place. A pull rebuilds ``review/`` from ``records.jsonl`` and the
submitted answers every time, so pulling again with no new answers writes the same bytes.
Routing and the hold-back of records that must be answered before export live in
``katdata/review_routing.py``.
Credentials come from ARGILLA_API_URL / ARGILLA_API_KEY (they win) or the recipe's ``review:``
section; they are never logged and never written to the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from katdata import template
from katdata.errors import EngineError, KatdataError, RunFolderError, require
from katdata.records import Attempt, Change, KatRecord, Vote
from katdata.redact import scrub
from katdata.stage import Stage
from katdata.run_folder import RunFolder
from katdata.review_routing import (  # noqa: F401  (re-exported: the routing policy and its config)
    ANNOTATION_DIR, ReviewConfig, answered, blocks, mode_confidence, route, verdict_index, waiting,
)

log = logging.getLogger(__name__)

BLOCKS = "blocks_export"  # the route term of records that export and train hold back until answered

# ---------------------------------------------------------------- connection


def _credentials(cfg: ReviewConfig) -> tuple[str, str]:
    url = os.environ.get("ARGILLA_API_URL") or cfg.api_url
    key = os.environ.get("ARGILLA_API_KEY") or (cfg.api_key.get_secret_value() if cfg.api_key else None)
    if not url or not key:
        raise KatdataError("no Argilla credentials: set ARGILLA_API_URL and ARGILLA_API_KEY (or review.api_url/api_key)")
    return url.rstrip("/"), key


def _scrub(text: str, key: str) -> str:
    return scrub(text, [key])


def connect(cfg: ReviewConfig):
    """An ``argilla.Argilla`` client, or KatdataError saying why the server cannot be used."""
    rg = require("argilla", "review")
    url, key = _credentials(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = rg.Argilla(api_url=url, api_key=key, timeout=cfg.timeout_s, retries=1)
            client.http_client.get("/api/v1/me").raise_for_status()
    except Exception as exc:  # the SDK raises many kinds; all mean "cannot use this server"
        raise EngineError(
            f"Argilla server at {url} cannot be used ({type(exc).__name__}: {_scrub(str(exc), key)[:300]}); "
            "is it running? (annotation/server.sh start) Nothing in the run folder was changed."
        ) from None
    return client


def _call(what: str, fn, *args, **kwargs):
    """Run one SDK/HTTP call; any failure becomes a KatdataError naming what was being done."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except KatdataError:
        raise
    except Exception as exc:
        key = os.environ.get("ARGILLA_API_KEY", "")
        raise EngineError(
            f"Argilla failed while {what} ({type(exc).__name__}: {_scrub(str(exc), key)[:300]}); "
            "nothing in the run folder was changed"
        ) from None


# ---------------------------------------------------------------- layout


def load_layout(path: Path) -> dict:
    path = Path(path)
    try:
        layout = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KatdataError(f"{path}: cannot read the dataset layout ({exc})") from exc
    for key in ("version", "fields", "questions", "metadata"):
        if key not in (layout or {}):
            raise KatdataError(f"{path}: the dataset layout has no '{key}'")
    guide = path.parent / layout.get("guidelines", "guidelines.md")
    layout["guidelines_text"] = guide.read_text(encoding="utf-8") if guide.is_file() else None
    return layout


def build_settings(layout: dict):
    rg = require("argilla", "review")
    fields = [rg.TextField(name=n, title=t, required=r, use_markdown=how == "code") for n, (t, r, how) in layout["fields"].items()]
    questions = []
    for name, q in layout["questions"].items():
        if q["type"] == "label":
            questions.append(rg.LabelQuestion(name=name, title=q["title"], labels=q["labels"], required=q["required"]))
        elif q["type"] == "text":
            questions.append(rg.TextQuestion(name=name, title=q["title"], required=q["required"], use_markdown=False))
        else:
            raise KatdataError(f"dataset layout: question '{name}' has unknown type {q['type']!r}")
    kinds = {"terms": rg.TermsMetadataProperty, "float": rg.FloatMetadataProperty, "integer": rg.IntegerMetadataProperty}
    metadata = [kinds[kind](name=n, title=t) for n, (kind, t) in layout["metadata"].items()]
    return rg.Settings(
        guidelines=layout.get("guidelines_text"),
        fields=fields,
        questions=questions,
        metadata=metadata,
        distribution=rg.TaskDistribution(min_submitted=int(layout.get("min_submitted", 1))),
    )


def dataset_name(cfg: ReviewConfig, run_dir: Path, layout: dict) -> str:
    return cfg.dataset or f"katdata-{Path(run_dir).resolve().name}-v{layout['version']}"


# ---------------------------------------------------------------- run-folder input


def _read(path: Path, model):
    from katdata.runfiles import read_rows

    return list(read_rows(path, model)) if Path(path).is_file() else []


def load_run(run_dir: Path) -> tuple[list[KatRecord], dict[str, Vote], dict[str, list[Attempt]]]:
    run_dir = Path(run_dir)
    records = _read(RunFolder(run_dir).records, KatRecord)
    if not (RunFolder(run_dir).records).is_file():
        raise KatdataError(f"{RunFolder(run_dir).records}: file not found (run the assemble stage first)")
    votes = {v.id: v for v in _read(RunFolder(run_dir).votes, Vote)}
    attempts: dict[str, list[Attempt]] = {}
    for path in (RunFolder(run_dir).samples, RunFolder(run_dir).solve):
        for a in _read(path, Attempt):
            attempts.setdefault(a.id, []).append(a)
    return records, votes, attempts


OUTPUTS = ("push.json", "changes.jsonl", "excluded.jsonl", "merged.jsonl", "pull.json")  # all review writes


def check_review_folder(run_dir: Path) -> None:
    """review writes only RUN/review/{OUTPUTS}, replacing katdata's own files; refuse before any server is asked
    when something else stands there (a file named review, a folder named merged.jsonl)."""
    folder = Path(run_dir) / "review"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RunFolderError(f"{folder}: {'a symbolic link' if folder.is_symlink() else 'a file'}, not the folder "
                             "where review writes its files; move it aside and rerun")
    for name in OUTPUTS:
        if (folder / name).is_dir() or (folder / name).is_symlink():
            raise RunFolderError(f"{folder / name}: not a file katdata wrote (a folder or a link); review rewrites it: "
                                 "move it aside and rerun")


def _write_atomic(path: Path, rows: list[dict] | dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if isinstance(rows, dict):
            f.write(json.dumps(rows, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- routing and merging (pure logic)


def _decisive(responses: list[dict]) -> Optional[dict]:
    """The last submitted or discarded response (drafts do not count); the latest one wins."""
    final = [r for r in responses if r.get("status") in ("submitted", "discarded")]
    return max(final, key=lambda r: (r.get("updated_at") or "", r.get("user_id") or "")) if final else None


def _think_on(attempts: list[Attempt]) -> Optional[Attempt]:
    """The shortest correct think-on attempt that parsed, for a record switched to think-on."""
    good = [a for a in attempts if a.mode == "on" and a.ok and a.correct and a.think and a.answer]
    return min(good, key=lambda a: (a.completion_tokens or len(a.text), a.index)) if good else None


def merge_one(rec: KatRecord, resp: dict, who: str, attempts: list[Attempt], dataset: str):
    """Apply one submitted response. Returns (new record, changes) or (None, reason)."""
    values = {k: (v or {}).get("value") for k, v in (resp.get("values") or {}).items()}
    text = {k: (values.get(k) or "").strip() or None for k in ("corrected_answer", "corrected_judge", "comment")}
    mode = values.get("mode") or rec.mode
    judge, answer, think = text["corrected_judge"] or rec.judge, text["corrected_answer"], rec.think
    content = rec.content_source
    if mode == "off":
        think = None
    elif rec.mode == "off":
        donor = _think_on(attempts)
        if donor is None:
            return None, "no_think_for_mode_on"
        think, answer = donor.think, answer or donor.answer
        content = "solver" if donor.source == "solver" else "sample"
    answer = answer or rec.answer
    if mode != rec.mode and not text["corrected_judge"]:
        return None, "stale_judge"
    if values.get("answer_ok") == "no" and not text["corrected_answer"]:
        return None, "answer_wrong_uncorrected"
    try:
        response = template.render(mode, judge, answer, think)
    except template.TemplateError as exc:
        return None, f"render_failed: {exc}"
    parsed = template.parse(response)
    if not parsed.ok or (parsed.mode, parsed.judge, parsed.think, parsed.answer) != (mode, judge, think, answer):
        return None, f"parse_failed: {','.join(parsed.errors) or 'fields differ after parsing'}"
    at = resp.get("updated_at") or resp.get("inserted_at")
    changes = [
        Change(field=f, old=getattr(rec, f), new=new, annotator=who, at=at)
        for f, new in (("mode", mode), ("judge", judge), ("think", think), ("answer", answer))
        if getattr(rec, f) != new
    ]
    review = {"dataset": dataset, "annotator": who, "at": at, "answer_ok": values.get("answer_ok"), "comment": text["comment"]}
    new = rec.model_copy(update={
        "mode": mode, "judge": judge, "think": think, "answer": answer, "response": response,
        "changes": list(rec.changes) + changes, "provenance": {**rec.provenance, "review": review},
        "label_source": "human" if values.get("mode") else rec.label_source,
        "content_source": content,
    })
    return KatRecord.model_validate(new.model_dump()), changes


def merge(records, answers: dict[str, list[dict]], users: dict[str, str], attempts: dict[str, list[Attempt]], dataset: str):
    """Merge the answers into the records: (merged records, change rows, excluded rows, stats)."""
    merged, change_rows, excluded = [], [], []
    stats = {"answered": 0, "changed": 0, "unanswered": 0, "discarded": 0, "excluded": {}}
    for rec in records:
        resp = _decisive(answers.get(rec.id, []))
        if resp is None:
            stats["unanswered"] += rec.id in answers
            merged.append(rec)
            continue
        stats["answered"] += 1
        who = users.get(resp.get("user_id"), resp.get("user_id"))
        at = resp.get("updated_at") or resp.get("inserted_at")
        if resp["status"] == "discarded":
            stats["discarded"] += 1
            excluded.append({"id": rec.id, "reason": "discarded", "annotator": who, "at": at})
            continue
        new, result = merge_one(rec, resp, who, attempts.get(rec.id, []), dataset)
        if new is None:
            stats["excluded"][result.split(":")[0]] = stats["excluded"].get(result.split(":")[0], 0) + 1
            excluded.append({"id": rec.id, "reason": result, "annotator": who, "at": at})
            continue
        stats["changed"] += bool(result)
        change_rows += [{"id": rec.id, **c.model_dump(mode="json")} for c in result]
        merged.append(new)
    return merged, change_rows, excluded, stats


# ---------------------------------------------------------------- push


def _verbatim(text: str) -> str:
    """A markdown code block that shows ``text`` as is (its fence is longer than any backtick run in it)."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def to_argilla(rec: KatRecord, vote: Optional[Vote], verdict: dict, reasons: list[str], layout: dict):
    """One ``argilla.Record`` for a KatRecord: fields, metadata and the two suggestions."""
    rg = require("argilla", "review")
    fields = {"query": rec.query, "judge": rec.judge, "answer": rec.answer, "response": rec.response}
    fields |= {k: v for k, v in (("think", rec.think), ("reference", rec.reference)) if v}
    fields = {k: _verbatim(v) if layout["fields"][k][2] == "code" else v for k, v in fields.items()}
    v = vote.model_dump() if vote else dict(rec.vote)
    tags = [f"{k}:{rec.tags[k]}" for k in ("domain", "task_type", "difficulty", "language") if rec.tags.get(k) is not None]
    meta: dict[str, Any] = {"route": reasons, "tags": tags, "voted_mode": [rec.mode]}
    for name in ("p_on", "p_off", "tokens_on", "tokens_off"):
        if isinstance(v.get(name), (int, float)):
            meta[name] = float(v[name])
    if isinstance(v.get("margin"), (int, float)):
        meta["vote_margin"] = float(v["margin"])
    if verdict.get("tokens"):
        meta["tokens"] = int(verdict["tokens"])
    meta = {k: val for k, val in meta.items() if k in layout["metadata"] and val not in (None, [])}
    suggestions = [rg.Suggestion("mode", rec.mode, score=mode_confidence(v, rec.mode), agent="katdata-vote")]
    if verdict.get("correct") is not None:
        p = v.get("p_on" if rec.mode == "on" else "p_off")
        score = min(1.0, max(0.0, float(p))) if isinstance(p, (int, float)) else None
        suggestions.append(rg.Suggestion("answer_ok", "yes" if verdict["correct"] else "no", score=score, agent="katdata-verifier"))
    return rg.Record(id=rec.id, fields=fields, metadata=meta, suggestions=suggestions)


def push(cfg: ReviewConfig, run_dir: Path) -> dict:
    """Create the workspace and dataset if needed and log the routed records. Returns stats."""
    run_dir = Path(run_dir)
    check_review_folder(run_dir)
    records, votes, attempts = load_run(run_dir)
    verdicts = verdict_index(records, votes, attempts)
    policy = cfg.model_copy(update={"route": "policy"})
    routed = []
    for rec in records:
        vote, verdict = votes.get(rec.id), verdicts.get(rec.id, {})
        reasons = route(rec, vote, verdict, cfg)
        if reasons and blocks(route(rec, vote, verdict, policy), policy):
            reasons.append(BLOCKS)  # the export waits for this one: reviewers can filter on it
        if reasons:
            routed.append((rec, reasons))
    layout = load_layout(cfg.settings)
    name = dataset_name(cfg, run_dir, layout)
    rows = [to_argilla(rec, votes.get(rec.id), verdicts.get(rec.id, {}), reasons, layout) for rec, reasons in routed]
    client = connect(cfg)
    rg = require("argilla", "review")
    ws = _call("reading the workspace", client.workspaces, cfg.workspace)
    if ws is None:
        ws = _call("creating the workspace", rg.Workspace(name=cfg.workspace, client=client).create)
    ds = _call("reading the dataset", client.datasets, name=name, workspace=ws)
    created = ds is None
    if created:
        ds = rg.Dataset(name=name, workspace=ws, settings=build_settings(layout), client=client)
        ds = _call("creating the dataset", ds.create)
    if rows:
        _call("logging records", ds.records.log, rows, batch_size=256)
    by_reason: dict[str, int] = {}
    for _, reasons in routed:
        for r in reasons:
            by_reason[r] = by_reason.get(r, 0) + 1
    stats = {
        "dataset": name, "workspace": cfg.workspace, "dataset_id": str(ds.id), "created": created,
        "records": len(records), "pushed": len(rows), "routed": dict(sorted(by_reason.items())),
        "route": cfg.route, "blocking": by_reason.get(BLOCKS, 0),
    }
    _write_atomic(run_dir / "review" / "push.json", stats)
    log.info("pushed %d of %d records to %s/%s", len(rows), len(records), cfg.workspace, name)
    return stats


def run(cfg: ReviewConfig, run_dir: Path, engine=None) -> dict:
    """The pipeline's review stage: push (pulling is a separate, later step)."""
    return push(cfg, run_dir)


# ---------------------------------------------------------------- pull


def fetch_responses(client, dataset_id: str, page: int = 500) -> dict[str, list[dict]]:
    """Submitted/discarded/draft responses of every record, by record id (read from the database)."""
    out: dict[str, list[dict]] = {}
    offset = 0
    while True:
        r = _call(
            "reading records", client.http_client.get, f"/api/v1/datasets/{dataset_id}/records",
            params={"include": "responses", "offset": offset, "limit": page},
        )
        _call("reading records", r.raise_for_status)
        body = r.json()
        for item in body["items"]:
            out[item["external_id"]] = item.get("responses") or []
        offset += len(body["items"])
        if not body["items"] or offset >= body.get("total", 0):
            return out


def usernames(client) -> dict[str, str]:
    r = _call("reading users", client.http_client.get, "/api/v1/users")
    if r.status_code != 200:  # an admin key may not list users: keep the ids
        return {}
    return {u["id"]: u["username"] for u in r.json()["items"]}


def pull(cfg: ReviewConfig, run_dir: Path) -> dict:
    """Read the answers and (re)write review/merged.jsonl, changes.jsonl and excluded.jsonl."""
    run_dir = Path(run_dir)
    check_review_folder(run_dir)
    records, votes, attempts = load_run(run_dir)
    layout = load_layout(cfg.settings)
    name = dataset_name(cfg, run_dir, layout)
    client = connect(cfg)
    ws = _call("reading the workspace", client.workspaces, cfg.workspace)
    ds = _call("reading the dataset", client.datasets, name=name, workspace=ws) if ws else None
    if ds is None:
        raise KatdataError(f"no dataset {cfg.workspace}/{name} on the Argilla server: run `katdata review push` first")
    answers = fetch_responses(client, str(ds.id))
    users = usernames(client)
    merged, changes, excluded, stats = merge(records, answers, users, attempts, dataset=name)
    out = run_dir / "review"
    _write_atomic(out / "changes.jsonl", changes)
    _write_atomic(out / "excluded.jsonl", excluded)
    _write_atomic(out / "merged.jsonl", [r.model_dump(mode="json") for r in merged])
    waits = waiting(run_dir, out / "merged.jsonl", cfg)  # the policy export applies
    stats |= {"dataset": name, "records": len(records), "merged": len(merged), "waiting": len(waits)}
    _write_atomic(out / "pull.json", stats)
    log.info("merged %d records (%d changed, %d excluded); %d still wait for review", len(merged),
             stats["changed"], len(excluded), len(waits))
    return stats


# ---------------------------------------------------------------- command


def _config(recipe: Optional[str], run_dir: Path) -> ReviewConfig:
    """The ``review:`` section of ``recipe``, else of the recipe the run was made with (whose copy of a key is
    redacted: the key then comes from ARGILLA_API_KEY)."""
    from katdata.run_folder import saved_recipe
    from katdata.settings import recipe_section

    cfg = recipe_section(recipe or saved_recipe(run_dir), "review", ReviewConfig)
    return cfg if recipe else cfg.model_copy(update={"api_key": None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="katdata review", description="Human review in Argilla.")
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("push", "push the records that need a human"), ("pull", "merge the submitted answers")):
        p = sub.add_parser(action, help=text)
        p.add_argument("run_dir", type=Path, help="the run folder (holds records.jsonl)")
        p.add_argument("--recipe", help="recipe YAML whose 'review:' section configures this "
                       "(default: the run folder's recipe.yaml)")
        p.add_argument("--dataset", help="Argilla dataset name (default katdata-<run>-v<version>)")
        p.add_argument("--workspace", help="Argilla workspace (default katdata)")
        if action == "push":
            p.add_argument("--all", action="store_true", help="push every record, not only the routed ones")
    args = parser.parse_args(argv)
    from katdata.errors import report
    from katdata.preflight import run_folder

    try:
        run_folder(args.run_dir, "review")
        cfg = _config(args.recipe, args.run_dir)
        updates = {k: v for k, v in (("dataset", args.dataset), ("workspace", args.workspace)) if v}
        if getattr(args, "all", False):
            updates["route"] = "all"
        cfg = cfg.model_copy(update=updates)
        stats = push(cfg, args.run_dir) if args.action == "push" else pull(cfg, args.run_dir)
    except KatdataError as exc:
        return report(exc, f"katdata review {args.action}")
    print(json.dumps(stats, indent=1, sort_keys=True))
    return 0


STAGE = Stage("review", "push records to Argilla for human review (pull merges the answers back)",
              lambda ctx: run(ctx.cfg, ctx.folder.root), ReviewConfig, reads=("records",),
              may_read=("votes", "samples", "solve"), writes=("review",), optional=True)

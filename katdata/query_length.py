"""Queries too long for the engines that read them, found by the load stage before any model loads.

A query fits an engine when its prompt (system text, query and ``ALLOWANCE`` tokens for the chat
template) plus the longest reply the recipe asks of that engine fit in the engine's context. The
context is the engine's ``max_model_len``, else the model folder's ``config.json``; an engine whose
context cannot be known without loading it (a server, a Hub id not yet downloaded) is not checked
here: its backend reports such a prompt per request.

A token covers at least one byte of text, so a query of fewer bytes than its budget fits without
tokenizing; only the longer ones are counted with the engine's tokenizer (no model weights load).
Too long: refused with one line naming the count and ids, or cut to fit when the recipe says
``data.truncate_too_long: true`` (the cut queries keep ``meta.truncated_from_tokens``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from katdata.errors import InputError, KatdataError, require

log = logging.getLogger(__name__)

ALLOWANCE = 64  # tokens of chat template around the query (role markers, the KAT generation prompt)
QUERY_STAGES = ("tag", "solve", "sample", "judge")  # the stages whose prompts hold the query
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
SHOWN = 8  # ids named in a message


@dataclass
class Limit:
    engine: str
    context: int
    reply: int  # the longest reply a stage asks of this engine
    folder: Path

    @property
    def budget(self) -> int:
        return self.context - self.reply - ALLOWANCE


def _reply_tokens(section: Any) -> int:
    """The largest ``max_tokens``-like setting of a stage section (its own fields, not nested ones)."""
    values = [getattr(section, name) for name in type(section).model_fields if "max_tokens" in name]
    return max((v for v in values if isinstance(v, int)), default=0)


def _folder(model: Optional[str]) -> Optional[Path]:
    from katdata.model import EMBEDDED, embedded_path

    if model in (None, "", EMBEDDED):
        return embedded_path(convert=False)
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _context(cfg: Any, folder: Optional[Path]) -> Optional[int]:
    if cfg.max_model_len:
        return cfg.max_model_len
    try:
        config = json.loads((folder / "config.json").read_text("utf-8")) if folder else {}
    except (OSError, ValueError):
        return None
    return next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)


def limits(recipe: Any) -> list[Limit]:
    """One limit per local engine that a query-reading stage uses, with the longest reply asked of it."""
    from katdata.fingerprint import engine_names

    reply: dict[str, int] = {}
    for stage in QUERY_STAGES:
        section = getattr(recipe, stage)
        for name in engine_names(section):
            reply[name] = max(reply.get(name, 0), _reply_tokens(section))
    out = []
    for name, tokens in reply.items():
        cfg = recipe.engines.get(name)
        if cfg is None or cfg.backend not in ("transformers", "vllm"):
            continue
        folder = _folder(cfg.model)
        context = _context(cfg, folder)
        if folder is None or context is None or not (folder / "config.json").is_file():
            log.debug("engine %s: context unknown before it loads; its prompts are checked per request", name)
            continue
        if context - tokens - ALLOWANCE < 1:
            raise KatdataError(f"engines.{name}: its context ({context} tokens) leaves no room for a query after "
                               f"the longest reply the recipe asks of it ({tokens} tokens); lower the stages' "
                               f"max_tokens or raise engines.{name}.max_model_len")
        out.append(Limit(name, context, tokens, folder))
    return out


def check(recipe: Any, queries: list) -> list:
    """The queries, each fitting every limit: refused (InputError) or cut to fit, as the recipe says."""
    for limit in limits(recipe):
        long = [q for q in queries if len(((q.system or "") + q.query).encode("utf-8")) + 2 > limit.budget]
        if not long:
            continue
        tokenizer = require("transformers", "local").AutoTokenizer.from_pretrained(str(limit.folder))
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0  # noqa: E731
        over = {q.id: (count(q.query), count(q.system)) for q in long}
        over = {i: n for i, n in over.items() if sum(n) > limit.budget}
        if not over:
            continue
        ids = list(over)
        shown = ", ".join(ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")
        where = (f"{len(ids)} queries do not fit engine '{limit.engine}' ({limit.context} tokens of context, "
                 f"{limit.reply} for the longest reply, {ALLOWANCE} for the chat template): {shown}")
        if not recipe.data.truncate_too_long:
            raise InputError("data", f"{where}; shorten or drop them, raise engines.{limit.engine}.max_model_len, "
                             "or set data.truncate_too_long: true to cut them to fit")
        log.warning("load: %s; cut to fit (data.truncate_too_long)", where)
        queries = [_cut(q, over[q.id], limit.budget, tokenizer) if q.id in over else q for q in queries]
    return queries


def _cut(query: Any, tokens: tuple[int, int], budget: int, tokenizer: Any) -> Any:
    """``query`` with its text cut to the tokens that fit beside its system text."""
    keep = budget - tokens[1]
    if keep < 1:
        raise InputError("data", f"query {query.id}: its system text alone ({tokens[1]} tokens) fills the budget of "
                         f"{budget} tokens; it cannot be cut to fit")
    ids = tokenizer(query.query, add_special_tokens=False)["input_ids"][:keep]
    meta = dict(query.meta or {}, truncated_from_tokens=tokens[0])
    return query.model_copy(update={"query": tokenizer.decode(ids), "meta": meta})

"""Padding-free packing for `katdata train`: several records share one row of at most ``max_length`` tokens.

Each packed row keeps every record's own ``labels`` (the completion-only mask from katdata.train.encode)
and carries ``seq_lengths``, the token count of each record in it. The collator turns those into
``position_ids`` that restart at 0 at every record; it sends no ``attention_mask``. That is what makes the
attention stop at record boundaries:

- SDPA / eager (the CPU): transformers' masking_utils (``find_packed_sequence_indices``) reads the restarts
  in ``position_ids`` when no 2D attention mask is given and ANDs a same-record block mask into the causal
  mask, per batch row. Rows stay separate (``flat=False``), so attention costs ``rows x max_length**2``,
  not ``(rows x max_length)**2``.
- flash-attention 2 (a GPU with flash_attn installed): the varlen kernel needs one flattened row, so the
  collator concatenates the batch into a single row (``flat=True``) and adds ``cu_seq_lens_q/k`` and
  ``max_length_q/k``; transformers then calls ``flash_attn_varlen_func`` with those boundaries.

The label of each record's first token is forced to -100 (it is a prompt token already), so the last token
of one record is never asked to predict the first token of the next.

Why not TRL's own ``packing=True``: TRL 1.16 packs the same way (best-fit decreasing, labels kept) but its
padding-free collator always flattens the whole batch into one row, which on SDPA materialises a mask and
scores over ``(batch x max_length)**2`` pairs, and it refuses a custom collator. Packing here and passing
``packing=False`` with ``data_collator=PackedCollator(...)`` keeps the rows apart on the CPU.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def attn_implementation(device: str | None = None) -> str:
    """``flash_attention_2`` on CUDA when flash_attn imports, else ``sdpa`` (both honour packed position ids)."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def pack_rows(encs: list[dict], max_length: int) -> list[dict]:
    """Best-fit decreasing: the longest record first, each into the fullest row it still fits, else a new row.

    ``encs``: dicts with ``input_ids`` and ``labels`` (katdata.train.encode). Returns rows with
    ``input_ids``, ``labels`` (the records' lists concatenated) and ``seq_lengths``. Deterministic; the
    trainer's sampler shuffles the rows."""
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i]["input_ids"]))
    rows: list[list[int]] = []   # record indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(encs[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"a record of {n} tokens does not fit max_length={max_length}")
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    out = []
    for members in rows:
        ids, labels = [], []
        for i in members:
            ids += encs[i]["input_ids"]
            labels += encs[i]["labels"]
        out.append({"input_ids": ids, "labels": labels,
                    "seq_lengths": [len(encs[i]["input_ids"]) for i in members]})
    return out


def packed_dataset(encs: list[dict], max_length: int):
    """A datasets.Dataset of packed rows (input_ids, labels, seq_lengths) for SFTTrainer with ``packing=False``
    (TRL keeps a ``seq_lengths`` column through its column pruning)."""
    import datasets

    rows = pack_rows(encs, max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    log.info("packing: %d records into %d rows of <= %d tokens (%.1f%% full)", len(encs), len(rows), max_length,
             100 * tokens / max(1, len(rows) * max_length))
    return datasets.Dataset.from_list(rows)


def position_ids(seq_lengths: list[int], total: int | None = None) -> list[int]:
    """0..n-1 for each record in turn; a tail up to ``total`` (padding) counts as one more sequence."""
    out = [p for n in seq_lengths for p in range(n)]
    if total is not None and total > len(out):
        out += range(total - len(out))
    return out


@dataclass
class PackedCollator:
    """Collates packed rows for padding-free training: input_ids, labels, position_ids; no attention_mask.

    ``flat=False`` (SDPA/eager): one batch row per packed row, right-padded to the longest with the pad id
    (labels -100; the pad tail gets its own position run, so it is a separate block no record attends to).
    ``flat=True`` (flash-attention 2): the batch as one row plus the varlen boundaries. ``tokens`` counts the
    real (non-padding) tokens collated so far."""

    pad_token_id: int
    flat: bool = False
    tokens: int = field(default=0, init=False)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        seqs = [list(ex.get("seq_lengths") or [len(ex["input_ids"])]) for ex in examples]
        for ex, lens in zip(examples, seqs):
            if sum(lens) != len(ex["input_ids"]) or len(ex["labels"]) != len(ex["input_ids"]):
                raise ValueError("a packed row's seq_lengths, input_ids and labels disagree")
        self.tokens += sum(sum(s) for s in seqs)
        if self.flat:
            examples = [{"input_ids": [t for ex in examples for t in ex["input_ids"]],
                         "labels": [t for ex in examples for t in ex["labels"]]}]
            seqs = [[n for s in seqs for n in s]]
        width = max(len(ex["input_ids"]) for ex in examples)
        ids, labels, pos = [], [], []
        for ex, lens in zip(examples, seqs):
            pad = width - len(ex["input_ids"])
            row_labels = list(ex["labels"]) + [-100] * pad
            start = 0
            for n in lens:  # the first token of a record never carries loss (nothing before it in its record)
                row_labels[start] = -100
                start += n
            ids.append(list(ex["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(row_labels)
            pos.append(position_ids(lens, width))
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}
        if self.flat:
            bounds = torch.tensor([0] + seqs[0], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = bounds
            out["max_length_q"] = out["max_length_k"] = max(seqs[0])
        return out


def collator_for(model, pad_token_id: int) -> PackedCollator:
    """The collator that fits the model's attention implementation (flat rows for flash-attention)."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return PackedCollator(pad_token_id=pad_token_id, flat=impl.startswith("flash"))

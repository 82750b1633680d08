"""The export card's counters (`CardStats`), filled a row group at a time while the export streams.

Sums that are floats (vote margins, pass rates) are added per row group, in the order the row groups come.
The counted groups (rows per mode, domain, difficulty, source, language, margin, model, changed field) are
gathered and grouped ``GROUP_ROWS`` rows at a time: one grouping per few dozen row groups instead of a dozen
per row group, which cost export a tenth of its time. Counts are integers, so any batching gives the same
counters, and a grouping lists its groups in the order they first occur, so the counters' keys come in the
same order as well. `finish` counts what is still gathered; the card calls it before it reads the counters.
"""

from __future__ import annotations

from collections import Counter, defaultdict

BY = ("domain", "difficulty", "task_type", "kind", "source")
GROUP_ROWS = 1 << 16  # rows gathered before they are grouped
_BY_PATHS = (("domain", "tags.domain"), ("difficulty", "tags.difficulty"), ("task_type", "tags.task_type"),
             ("kind", "kind"), ("source", "provenance.source"))


def _group(*cols) -> list[tuple]:
    """(value, ..., count) per distinct combination of the columns' values, in order of first occurrence."""
    import pyarrow as pa

    names = [f"c{i}" for i in range(len(cols))]
    g = pa.table(dict(zip(names, cols))).group_by(names, use_threads=False).aggregate([([], "count_all")])
    return list(zip(*(g.column(c).to_pylist() for c in names), g.column("count_all").to_pylist()))


class CardStats:
    """Counters over the exported records, filled a batch (pyarrow Table in the hf layout) at a time."""

    def __init__(self) -> None:
        self.n = 0
        self.splits: Counter = Counter()
        self.modes: Counter = Counter()
        self.label_sources: Counter = Counter()
        self.content_sources: Counter = Counter()
        self.by: dict[str, dict[str, Counter]] = {k: defaultdict(Counter) for k in BY}
        self.margins: Counter = Counter()  # margin rounded to 0.1
        self.margin_sum, self.voted = 0.0, 0
        self.p_sum, self.p_n = {"on": 0.0, "off": 0.0}, {"on": 0, "off": 0}
        self.explored, self.flagged, self.reviewed = 0, 0, 0
        self.changed_fields: Counter = Counter()
        self.models: Counter = Counter()
        self.chars = {"on": 0, "off": 0}
        self.languages: Counter = Counter()
        self.plotted = False
        self.review_note: str | None = None  # set by export: records held back for review
        self._rows: list = []  # gathered for grouping: per row group, its row columns
        self._flat: list = []  # and its changed fields and (role, model) pairs
        self._gathered = 0

    def add_table(self, t, test) -> None:
        """Count one batch: ``t`` in the hf layout (a pyarrow Table), ``test`` its test-split mask."""
        import pyarrow as pa
        import pyarrow.compute as pc

        def col(path: str):
            head, *rest = path.split(".")
            c = t.column(head).combine_chunks()
            for name in rest:
                c = pc.struct_field(c, name)
            return c

        n = t.num_rows
        n_test = pc.sum(test).as_py() or 0
        self.n += n
        self.splits.update({"train": n - n_test, "test": n_test})
        margin = col("vote.margin")
        self.voted += pc.sum(pc.is_valid(margin)).as_py() or 0
        self.margin_sum += pc.sum(margin).as_py() or 0.0
        for m in ("on", "off"):
            p = col(f"vote.p_{m}")
            self.p_sum[m] += pc.sum(p).as_py() or 0.0
            self.p_n[m] += pc.sum(pc.is_valid(p)).as_py() or 0
        self.explored += pc.sum(pc.fill_null(col("vote.explored"), False)).as_py() or 0
        self.flagged += pc.sum(pc.fill_null(col("vote.review"), False)).as_py() or 0
        changes = col("provenance.changes")
        self.reviewed += pc.sum(pc.greater(pc.list_value_length(changes), 0)).as_py() or 0
        rows = {"mode": col("mode"), "length": pc.utf8_length(col("response")),
                **{key: col(path) for key, path in _BY_PATHS},
                "label_source": col("label_source"), "content_source": col("content_source"),
                "language": col("tags.language"), "margin": pc.round(margin, 1)}
        models = pc.list_flatten(col("provenance.models"))
        self._rows.append(pa.table(rows))
        self._flat.append((pc.struct_field(pc.list_flatten(changes), "field"), pc.struct_field(models, "role"),
                           pc.struct_field(models, "model")))
        self._gathered += n
        if self._gathered >= GROUP_ROWS:
            self.finish()

    def finish(self) -> None:
        """Count the rows gathered so far (the counters are complete after it)."""
        if not self._rows:
            return
        import pyarrow as pa

        t = pa.concat_tables(self._rows)
        fields, roles, names = (pa.chunked_array(c) for c in zip(*self._flat))
        self._rows, self._flat, self._gathered = [], [], 0
        mode = t.column("mode")
        for m, length, c in _group(mode, t.column("length")):
            self.modes[m] += c
            self.chars[m] += length * c
        for key, _ in _BY_PATHS:
            for v, m, c in _group(t.column(key), mode):
                self.by[key][str(v) if v is not None else "-"][m] += c
        for key, counter in (("label_source", self.label_sources), ("content_source", self.content_sources)):
            for v, c in _group(t.column(key)):
                counter[v or "-"] += c
        for lang, c in _group(t.column("language")):
            if lang is not None:
                self.languages[lang] += c
        for m, c in _group(t.column("margin")):
            if m is not None:
                self.margins[m + 0.0] += c
        for f, c in _group(fields):
            self.changed_fields[f] += c
        for r, m, c in _group(roles, names):
            self.models[(r, m)] += c

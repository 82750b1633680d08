"""The load stage: the recipe's queries (an input file with a field map, packaged sources), validated
before the run folder changes, written to ``loaded.jsonl``.

Every problem is found by ``prepare`` (the pipeline calls it before it touches the run folder): a bad
row, a renamed column no row has, ids given twice, a query too long for an engine's context.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from katdata.errors import KatdataError
from katdata.stage import Context, Stage


def load_queries(recipe: Any) -> list:
    """The recipe's queries (file and packaged sources), validated before any model loads."""
    from katdata import sources
    from katdata.inputs import read_queries

    if recipe.data is None:
        raise KatdataError("recipe: the load stage needs a 'data' section (data.path or data.sources)")
    queries = []
    if recipe.data.path:
        if not Path(recipe.data.path).exists():
            raise KatdataError(f"recipe key data.path: input not found: {recipe.data.path}")
        queries += read_queries(recipe.data.path, recipe.data.fields)
    for spec in recipe.data.sources:
        queries += sources.load(spec.name, spec.limit, seed=recipe.seed, max_solution_lines=spec.max_solution_lines)
    if recipe.data.limit:
        queries = queries[: recipe.data.limit]
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise KatdataError("data: the same query id comes from two inputs; give them distinct ids")
    from katdata.query_length import check

    return check(recipe, queries)


def run(ctx: Context) -> dict:
    queries = ctx.prepared
    path = ctx.folder.loaded
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(q.model_dump_json() + "\n")
    os.replace(tmp, path)
    cut = sum(1 for q in queries if "truncated_from_tokens" in (q.meta or {}))
    return {"rows_in": len(queries), "rows_out": len(queries), **({"truncated": cut} if cut else {})}


STAGE = Stage("load", "read the recipe's queries (data.path, data.sources), checked before any model loads", run,
              writes=("loaded",), sections=("data", "seed"), prepare=load_queries)

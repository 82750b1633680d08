"""Start argilla-server 2.8 with one fix for noida-db; run with .venv-argilla's python.

    python annotation/argilla_launch.py --host 127.0.0.1 --port 6900

Why: Argilla maps a record's responses as a ``nested`` field with ``include_in_root: true`` and
asks for a user's *pending* records with a root-level ``must_not term responses.user_id``. noida-db
ignores ``include_in_root``, so that root-level term never matches and records the user has
already submitted or discarded stay in the "Pending" queue of the web UI. Here the pending filter
is rebuilt as ``must_not nested(responses, term user_id)``, which means the same on real
Elasticsearch and works on noida-db. Everything else is the stock server (``argilla_server start``).
"""

from __future__ import annotations

import argparse


def _patch_pending_filter() -> None:
    from argilla_server.enums import ResponseStatusFilter
    from argilla_server.search_engine import commons

    engine = commons.BaseElasticAndOpenSearchEngine
    stock = engine._response_status_filter_to_es_filter

    def status_filter(self, filter):  # noqa: A002 - the stock signature
        if ResponseStatusFilter.pending not in filter.values:
            return stock(self, filter)
        if filter.scope.user:
            answered = {"term": {"responses.user_id": str(filter.scope.user.id)}}
        else:
            answered = {"exists": {"field": "responses.user_id"}}
        pending = {"bool": {"must_not": [{"nested": {"path": "responses", "query": answered}}]}}
        filter.values.remove(ResponseStatusFilter.pending)
        if not filter.values:
            return pending
        return {"bool": {"should": [pending, stock(self, filter)], "minimum_should_match": 1}}

    engine._response_status_filter_to_es_filter = status_filter


def main() -> None:
    parser = argparse.ArgumentParser(prog="argilla_launch", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6900, help="port to bind (default 6900)")
    args = parser.parse_args()
    _patch_pending_filter()
    import uvicorn
    from argilla_server import app

    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()

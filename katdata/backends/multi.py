"""One stream over several engines: a stage whose steps go to different engines (the solver's roles).

``stream_routed(backends, route, source)`` speaks the protocol of :meth:`Backend.stream` (``source``
yields jobs, ``WAIT`` and answered pairs) and sends each job to ``route(job)``. With one engine it is
that engine's own ``stream``. With several, each engine streams in its own thread from its own queue,
so each keeps its window full while the others work; the stage still sees one result at a time, in
the calling thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

from katdata.backends.base import WAIT, Backend, Completion, Job, SourceItem

_END = object()  # tells an engine's feed that the stage has nothing more for it


def stream_routed(backends: Iterable[Backend], route: Callable[[Job], Backend],
                  source: Iterable[SourceItem]) -> Iterator[tuple[Job, list[Completion]]]:
    """Yield ``(job, completions)`` for every job of ``source``, each job served by ``route(job)``."""
    engines = list({id(b): b for b in backends}.values())
    if len(engines) == 1:
        yield from engines[0].stream(source)
        return
    results: queue.Queue = queue.Queue()
    feeds = {id(b): queue.Queue() for b in engines}
    threads = [threading.Thread(target=_serve, args=(b, feeds[id(b)], results), daemon=True,
                                name=f"katdata-{b.name}-{k}") for k, b in enumerate(engines)]
    for t in threads:
        t.start()
    it, pending, exhausted = iter(source), 0, False
    try:
        while True:
            item = WAIT if exhausted else next(it, StopIteration)
            if item is StopIteration:
                exhausted = True
            elif item is WAIT:
                if not pending:
                    if exhausted:
                        return
                    raise RuntimeError("stream source waits with nothing in flight")
                job, comps, exc = results.get()
                if exc is not None:
                    raise exc
                pending -= 1
                yield job, comps
            elif isinstance(item, tuple):  # already answered
                yield item
            else:
                feeds[id(route(item))].put(item)
                pending += 1
    finally:
        for feed in feeds.values():
            feed.put(_END)
        for t in threads:
            t.join(timeout=60)


def _serve(backend: Backend, feed: queue.Queue, results: queue.Queue) -> None:
    """Run ``backend.stream`` over the jobs put on ``feed``, putting each result on ``results``."""
    out = [0]  # jobs handed to the engine and not yet answered

    def jobs():
        while True:
            try:
                item = feed.get_nowait()
            except queue.Empty:
                if out[0]:
                    yield WAIT  # the engine answers something before we look again
                    continue
                item = feed.get()  # nothing out: sleep until the stage has a job for this engine
            if item is _END:
                return
            out[0] += 1
            yield item

    try:
        for job, comps in backend.stream(jobs()):
            out[0] -= 1
            results.put((job, comps, None))
    except BaseException as exc:  # noqa: BLE001 - raised again in the stage's thread
        results.put((None, None, exc))

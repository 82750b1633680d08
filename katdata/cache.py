"""The request cache: an append-only, crash-safe JSONL file of finished completions.

A completion is keyed by the backend, the model id, revision and adapter, the rendered prompt, the
sampling params (all but ``n``) and the sample index. So sample i is never served for sample j, a
rerun after kill -9 reuses every completion that was written, and changing a parser or a later
stage regenerates nothing. Failed requests (``finish_reason="error"``) are not cached: a rerun
tries them again. Nothing secret reaches the file: keys are hashes of the identity above (no URL,
no key), rows hold completions only, and error completions (whose text may quote a server) are
never written. In memory the cache keeps only an index (a key's digest and where its line starts in
the file, about 150 bytes a completion); a hit reads its line back.

When some samples of a request are cached and the rest are not, only the missing ones are
generated, with the seed moved by the index of the first missing sample (vLLM seeds sample i of a
request with ``seed + i``, so there the resumed samples are the very ones an uninterrupted run
draws; transformers seeds each batch by its content, so a re-issued call whose finished batches
are cached redraws the remaining batches exactly; other engines give fresh draws, never copies).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from katdata.backends.base import WAIT, Backend, Completion, Job, Request, SamplingParams
from katdata.runfiles import repair_tail

log = logging.getLogger(__name__)


def cache_key(backend: Backend, prompt: str, params: SamplingParams, index: int) -> str:
    """The key of sample ``index`` of ``prompt`` under ``params`` on ``backend``."""
    cfg = backend.config
    ident = {
        "backend": backend.name,
        "model": backend.model_id,
        "revision": cfg.revision,
        "lora": cfg.lora_path,
        "prompt": prompt,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": sorted(params.stop),
        "seed": params.seed,
        "logprobs": params.logprobs,
        "index": index,
    }
    if params.repetition_penalty != 1.0:  # only when set, so keys written before the field existed still match
        ident["repetition_penalty"] = params.repetition_penalty
    if params.frequency_penalty:  # likewise
        ident["frequency_penalty"] = params.frequency_penalty
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


class CachedBackend(Backend):
    """Wraps a backend; ``generate`` serves cached samples and writes each new one as it finishes."""

    def __init__(self, backend: Backend, path: str | os.PathLike, fsync: bool = False):
        super().__init__(backend.config)
        self.backend = backend
        self.name = backend.name
        self.model_id = backend.model_id
        self.path = Path(path)
        self.fsync = fsync
        self.hits = 0
        self.misses = 0
        # key digest -> where its line starts: the completions stay in the file, not in memory
        self._index: dict[bytes, int] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._f = open(self.path, "ab")
        self._r = open(self.path, "rb")

    def __repr__(self) -> str:
        return f"CachedBackend({self.backend!r}, path={str(self.path)!r})"

    def _load(self) -> None:
        if not self.path.is_file():
            return
        repair_tail(self.path)
        offset = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    row = json.loads(raw)
                    Completion(**row["completion"])
                    self._index[bytes.fromhex(row["key"])] = offset
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("%s:%d: skipping a broken cache line (%s)", self.path, n, exc)
                offset += len(raw)
        log.info("request cache %s: %d completions", self.path, len(self._index))

    def _get(self, key: str) -> Optional[Completion]:
        """The cached completion of ``key`` (read back from the file), or None."""
        offset = self._index.get(bytes.fromhex(key))
        if offset is None:
            return None
        self._r.seek(offset)
        return Completion(**json.loads(self._r.readline())["completion"])

    def render_prompt(self, request: Request) -> str:
        render = getattr(self.backend, "render_prompt", None)
        return render(request) if render else request.prompt()

    def _put(self, key: str, comp: Completion) -> None:
        if comp.finish_reason == "error":
            return
        offset = self._f.tell()
        self._f.write((json.dumps({"key": key, "completion": asdict(comp)}, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        self._index[bytes.fromhex(key)] = offset
        if self.fsync:
            os.fsync(self._f.fileno())

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done=None) -> list[list[Completion]]:
        keys = []
        results: list[list[Optional[Completion]]] = []
        missing: dict[tuple[int, ...], list[int]] = {}  # missing sample indices -> request positions
        for i, req in enumerate(requests):
            prompt = self.render_prompt(req)
            ks = [cache_key(self.backend, prompt, params, j) for j in range(params.n)]
            row = [self._get(k) for k in ks]
            keys.append(ks)
            results.append(row)
            gaps = tuple(j for j, c in enumerate(row) if c is None)
            self.hits += params.n - len(gaps)
            self.misses += len(gaps)
            if gaps:
                missing.setdefault(gaps, []).append(i)
            elif on_done:
                on_done(i, row)
        for gaps, positions in missing.items():
            self._fill(requests, params, gaps, positions, keys, results, on_done)
        return results  # type: ignore[return-value]

    def _fill(self, requests, params, gaps, positions, keys, results, on_done) -> None:
        """Generate the samples ``gaps`` of the requests at ``positions``, in contiguous runs."""
        runs, start = [], 0
        for k in range(1, len(gaps) + 1):
            if k == len(gaps) or gaps[k] != gaps[k - 1] + 1:
                runs.append(gaps[start:k])
                start = k
        for run_no, run in enumerate(runs):
            seed = None if params.seed is None else params.seed + run[0]
            sub = params.with_(n=len(run), seed=seed)
            last = run_no == len(runs) - 1

            def store(local: int, comps: list[Completion], run=run, last=last) -> None:
                i = positions[local]
                for j, comp in zip(run, comps):
                    results[i][j] = comp
                    self._put(keys[i][j], comp)
                if last and on_done:
                    on_done(i, results[i])

            batch = [requests[i] for i in positions]
            if "on_done" in inspect.signature(self.backend.generate).parameters:
                self.backend.generate(batch, sub, on_done=store)
            else:
                step = max(1, self.backend.config.batch_size)
                for lo in range(0, len(batch), step):
                    for k, comps in enumerate(self.backend.generate(batch[lo:lo + step], sub)):
                        store(lo + k, comps)

    def stream(self, source, wave_limit: int = 4096):
        """Cached jobs come back at once; the rest go to the engine's own ``stream``.

        A synchronous engine (no ``stream`` of its own) is served in waves through the cached
        ``generate``, so a resumed run re-forms the very batches of an uninterrupted one."""
        if type(self.backend).stream is Backend.stream:
            yield from Backend.stream(self, source, wave_limit)
            return

        def misses():
            for item in source:
                yield item if item is WAIT or isinstance(item, tuple) else self._lookup(item)

        for job, comps in self.backend.stream(misses(), wave_limit):
            yield self._merge(job, comps) if isinstance(job.key, _Pending) else (job, comps)

    def generate_wave(self, jobs: list[Job]) -> list[list[Completion]]:
        """A wave of a synchronous engine's stream: hits from the file, the rest in one engine wave."""
        looked = [self._lookup(job) for job in jobs]
        sent = [x for x in looked if isinstance(x, Job)]
        outs = iter(self.backend.generate_wave(sent) if sent else [])
        return [x[1] if isinstance(x, tuple) else self._merge(x, next(outs))[1] for x in looked]

    def _lookup(self, job: Job):
        """``(job, completions)`` when every sample is cached, else a job for the missing ones."""
        params = job.params
        prompt = self.render_prompt(job.request)
        keys = [cache_key(self.backend, prompt, params, j) for j in range(params.n)]
        row = [self._get(k) for k in keys]
        gaps = [j for j, c in enumerate(row) if c is None]
        self.hits += params.n - len(gaps)
        self.misses += len(gaps)
        if not gaps:
            return job, row
        lo, hi = gaps[0], gaps[-1] + 1  # one call for the missing samples (seed moved to the first)
        seed = None if params.seed is None else params.seed + lo
        return Job(_Pending(job, keys, row, lo), job.request, params.with_(n=hi - lo, seed=seed))

    def _merge(self, sent: Job, comps: list[Completion]):
        p = sent.key
        for j, comp in enumerate(comps, start=p.lo):
            if p.row[j] is None:
                p.row[j] = comp
                self._put(p.keys[j], comp)
        return p.job, p.row

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._r.close()
        self.backend.close()


class _Pending:
    """The cache's handle on a job sent to the engine: the stage's job and its cached samples."""

    def __init__(self, job: Job, keys: list[str], row: list[Optional[Completion]], lo: int):
        self.job, self.keys, self.row, self.lo = job, keys, row, lo

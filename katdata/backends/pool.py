"""Servers behind the openai backend: who is up, who has room, and how full the window is.

:class:`ServerPool` hands each call the healthy server with the fewest calls in flight. A server
marked down leaves the rotation; a background task asks its ``/health`` (then ``/v1/models``) every
``health_interval_s`` and puts it back once it answers. ``acquire`` waits while every server is
down and fails, naming them, when none has answered for ``unavailable_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)


class Fatal(Exception):
    """An error that fails the whole run (wrong key, wrong model, no server answering)."""


@dataclass
class Server:
    client: Any  # openai.AsyncOpenAI
    name: str  # the base URL, secrets masked
    in_flight: int = 0
    up: bool = True
    why: str = ""  # the last failure, for the message when all are down
    served: int = 0  # calls answered


@dataclass
class ServerPool:
    clients: list
    names: list[str]
    unavailable_s: float = 300.0
    health_interval_s: float = 2.0
    servers: list[Server] = field(init=False)
    ever_answered: bool = field(init=False, default=False)

    def __post_init__(self):
        self.servers = [Server(c, n) for c, n in zip(self.clients, self.names)]
        self._last_answer = time.monotonic()
        self._changed = asyncio.Event()
        self._watch: Optional[asyncio.Task] = None
        self._turn = 0

    async def acquire(self) -> Server:
        """The healthy server with the fewest calls in flight (waits while none is up)."""
        while True:
            up = [s for s in self.servers if s.up]
            if up:
                self._turn += 1
                best = min(up, key=lambda s: (s.in_flight, (self.servers.index(s) - self._turn) % len(self.servers)))
                best.in_flight += 1
                return best
            waited = time.monotonic() - self._last_answer
            if waited > self.unavailable_s:

                raise Fatal(f"no server has answered for {waited:.0f} s (extra.unavailable_s = "
                             f"{self.unavailable_s:g}): " + "; ".join(f"{s.name}: {s.why}" for s in self.servers))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(self.health_interval_s, 1.0))
            except asyncio.TimeoutError:
                pass

    def release(self, server: Server) -> None:
        server.in_flight -= 1

    def answered(self, server: Server) -> None:
        server.served += 1
        self.ever_answered = True
        self._last_answer = time.monotonic()

    def others_up(self, server: Server) -> bool:
        return any(s.up for s in self.servers if s is not server)

    def down(self, server: Server, why: str) -> None:
        """Take ``server`` out of the rotation (its calls move to the others) until it answers again."""
        server.why = why
        if server.up:
            server.up = False
            log.warning("server %s left the rotation (%s); %d others up", server.name, why,
                        sum(s.up for s in self.servers))
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._health())

    async def _health(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=5.0) as http:
            while any(not s.up for s in self.servers):
                await asyncio.sleep(self.health_interval_s)
                for s in self.servers:
                    if not s.up and await _answers(http, str(s.client.base_url)):
                        s.up = True
                        log.warning("server %s answers again: back in the rotation", s.name)
                        self._changed.set()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for s in self.servers:
            await s.client.close()


async def _answers(http, base_url: str) -> bool:
    """True when the server behind ``base_url`` (".../v1") answers ``/health`` or ``/v1/models``."""
    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    for url in (root + "/health", base_url.rstrip("/") + "/models"):
        try:
            if (await http.get(url)).status_code == 200:
                return True
        except Exception:  # noqa: BLE001 - down, refused, timed out: not up yet
            pass
    return False


class Occupancy:
    """Time-weighted mean of requests in flight (counted where they are sent and answered) over
    the window, while the stage still has work to hand out (``more``), for benches and tests."""

    def __init__(self):
        self.reset()

    def reset(self, window: int = 1) -> None:
        self.window, self.more = window, True
        self._t: Optional[float] = None
        self._n = 0
        self.area = self.time = 0.0

    def change(self, delta: int) -> None:
        now = time.monotonic()
        if self._t is not None and self.more:
            self.area += self._n / self.window * (now - self._t)
            self.time += now - self._t
        self._t, self._n = now, self._n + delta

    @property
    def mean(self) -> float:
        return self.area / self.time if self.time else 0.0

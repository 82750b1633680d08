"""The pipeline's stages, in order: one line each. A stage is its module's ``STAGE`` (katdata.stage)."""

from __future__ import annotations

import importlib
from functools import lru_cache

from katdata.stage import Stage

STAGE_MODULES = (
    "katdata.load",
    "katdata.decontaminate",
    "katdata.tag",
    "katdata.solve",
    "katdata.sample",
    "katdata.vote",
    "katdata.judge",
    "katdata.assemble",
    "katdata.review",
    "katdata.export",
    "katdata.train",
    "katdata.rl",
    "katdata.evaluate",
)


@lru_cache(maxsize=None)
def all_stages() -> tuple[Stage, ...]:
    return tuple(importlib.import_module(name).STAGE for name in STAGE_MODULES)


def names() -> list[str]:
    return [s.name for s in all_stages()]


def get(name: str) -> Stage:
    return next(s for s in all_stages() if s.name == name)

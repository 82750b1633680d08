"""The stage contract: what a stage is, said once, in the stage's own module.

Each stage module ends with ``STAGE = Stage(...)``: its name, the config class of its recipe section,
the run files it reads and writes (keys of ``katdata.run_folder.FILES``), the other recipe sections
its output depends on, and ``run(ctx)``. ``katdata.stages.STAGE_LIST`` puts them in order. Everything
else derives from the declarations: the recipe's sections, the pipeline's order and ``--from`` /
``--until``, the fingerprints (a stage's settings are its section, the sections it declares and the
engines they name), the checks before a run, the stage commands, ``katdata ls`` and the report.

A stage's ``run(ctx)`` gets a :class:`Context`: the recipe, the run folder with its named paths, the
engines, and its own section as ``ctx.cfg``; other sections only as ``ctx.section(NAME)``, for the
sections it declares (so its fingerprint covers every setting that shapes its output). It returns its
statistics for summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from katdata.run_folder import FILES

if TYPE_CHECKING:
    from katdata.run_folder import RunFolder


@dataclass(frozen=True)
class Stage:
    name: str
    help: str                          # one line: `katdata ls`, the stage command's help, the recipe section's help
    run: Callable[["Context"], dict]   # reads its inputs, writes ``writes``, returns its statistics
    config: Optional[type] = None      # the pydantic class of the recipe section named ``name`` (None: no section)
    reads: tuple[str, ...] = ()        # run-file keys (katdata.run_folder.FILES) it cannot start without
    may_read: tuple[str, ...] = ()     # run-file keys it reads when they are there
    writes: tuple[str, ...] = ()       # run-file keys it writes
    maybe_writes: tuple[str, ...] = () # of ``writes``, those it may leave unwritten (a plot drawn only with enough data)
    sections: tuple[str, ...] = ()     # other recipe sections (or top-level keys) its output depends on
    optional: bool = False             # runs only when the recipe has its section
    when_absent: Optional[Callable[[], Any]] = None  # the section's value when a recipe leaves it out (default: the
    #                                                 config's defaults; an optional stage's: None, not run)
    inputs: Optional[Callable[[Any, Path], list]] = None  # the files its fingerprint hashes, when they depend on
    #                                                     the settings (default: its reads and may_read)
    prepare: Optional[Callable[[Any], Any]] = None  # checks made before the run folder changes (the load stage
    #                                               reads its input here); the result reaches run as ctx.prepared

    def files(self, keys: tuple[str, ...]) -> list[str]:
        """The run-folder paths of run-file keys (katdata.run_folder.FILES)."""
        return [FILES[k] for k in keys]


@dataclass
class Context:
    """What ``Stage.run`` gets: the whole recipe, the run folder, the engines, and the stage's own section."""

    recipe: Any
    folder: "RunFolder"
    engines: Callable[[str], Any]
    stage: Stage
    prepared: Any = None  # what ``stage.prepare`` returned

    @property
    def cfg(self) -> Any:
        return getattr(self.recipe, self.stage.name, None)

    def section(self, name: str) -> Any:
        """A section the stage declared in ``sections`` (asking for another one is a bug in the stage)."""
        if name not in self.stage.sections:
            raise AttributeError(f"stage {self.stage.name} reads recipe section '{name}' but does not declare it")
        return getattr(self.recipe, name)

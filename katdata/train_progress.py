"""The progress of a training stage (train, rl): one bar with step, loss and ETA, in place of TRL's dicts.

transformers' ``Trainer`` adds ``PrinterCallback`` when ``disable_tqdm`` is set (each logged dict
``print``-ed to stdout: ``{'loss': '2.688', ...}``) and ``ProgressCallback`` otherwise (its own bar, the
dicts written under it). ``attach`` takes both off the trainer and adds ``StageProgress``:

- stderr a terminal: a tqdm bar ``train: 40%|...| 2/5 [00:10<00:15, 5.03s/step, loss=2.69]`` (the last
  logged loss, and the mean reward for GRPO);
- stderr not a terminal (CI logs): an INFO line at each tenth of the steps, with the loss and time left;
- the logged dicts only under ``katdata -v`` (katdata's loggers at DEBUG), as log lines that the CLI's
  handler writes above the bar.

Only the main process shows anything (``state.is_world_process_zero``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from transformers import TrainerCallback

log = logging.getLogger(__name__)

FIGURES = ("loss", "reward")  # the logged values the bar shows


def verbose() -> bool:
    """True under ``katdata -v``: the CLI puts katdata's loggers at DEBUG then."""
    return logging.getLogger("katdata").isEnabledFor(logging.DEBUG)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StageProgress(TrainerCallback):
    """The bar (or the progress lines) of one training stage; ``enabled`` defaults to stderr being a
    terminal, ``show_logs`` to ``verbose()``."""

    def __init__(self, stage: str, enabled: Optional[bool] = None, show_logs: Optional[bool] = None, file=None):
        self.stage, self.file = stage, file
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.show_logs = verbose() if show_logs is None else show_logs
        self.bar = None
        self.figures: dict[str, str] = {}
        self._t0, self._step0, self._next_line = 0.0, 0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._t0, self._step0 = time.monotonic(), state.global_step  # a resumed run starts at its checkpoint
        self._next_line = state.global_step + 1
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                            file=self.file, leave=True, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        elif not self.enabled and state.global_step >= self._next_line:
            self._next_line = state.global_step + max(1, state.max_steps // 10)
            log.info("%s: step %d/%d%s, %s left", self.stage, state.global_step, state.max_steps,
                     "".join(f", {k} {v}" for k, v in self.figures.items()), self._left(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = {k: f"{logs[k]:.3g}" for k in FIGURES if isinstance(logs.get(k), (int, float))}
        if shown:
            self.figures = shown
            if self.bar is not None:
                self.bar.set_postfix(shown, refresh=True)
        if self.show_logs:
            log.info("%s step %d: %s", self.stage, state.global_step,
                     {k: _short(v) for k, v in logs.items() if k != "total_flos"})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None

    def _left(self, state) -> str:
        done = state.global_step - self._step0
        if done <= 0:
            return "?"
        secs = int((time.monotonic() - self._t0) / done * max(0, state.max_steps - state.global_step))
        return f"{secs // 60}:{secs % 60:02d}"


def attach(trainer, stage: str) -> StageProgress:
    """Replace the trainer's printer / progress callbacks with a ``StageProgress`` for ``stage``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = StageProgress(stage)
    trainer.add_callback(progress)
    return progress

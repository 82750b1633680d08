"""What a run shows a person: a progress bar per stage and the summary table at the end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "row"):
    """A tqdm bar with count, rate and ETA; silent when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False,
                dynamic_ncols=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def summary_rows(data: dict) -> list[tuple[str, str, str, str, str]]:
    """(stage, rows in, rows out, seconds, notes) for each stage that ran."""
    rows = []
    for stage, st in data.get("stages", {}).items():
        notes = {k: v for k, v in st.items() if k not in ("rows_in", "rows_out", "seconds", "done")}
        rows.append((stage, _fmt(st.get("rows_in")), _fmt(st.get("rows_out")), _fmt(st.get("seconds")), _fmt(notes)))
    return rows


def print_summary(data: dict, run_dir: Path, wall_s: float) -> None:
    """The end-of-run table: counts, time and notes per stage (mode ratio, pass rates, tokens), and where things are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"katdata run: {run_dir}  ({wall_s:.0f} s)", show_lines=False)
    for col in ("stage", "in", "out", "seconds", "notes"):
        table.add_column(col, overflow="fold")
    for row in summary_rows(data):
        table.add_row(*row)
    console = Console(width=140)
    console.print(table)
    where = {"dataset": run_dir / "export", "adapter": run_dir / "train" / "adapter", "report": run_dir / "eval" / "eval.json"}
    for what, path in where.items():
        if path.exists():
            console.print(f"{what}: {path}")

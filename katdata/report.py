"""What a run shows a person: a progress bar per stage and the summary table at the end."""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from katdata.run_folder import RunFolder

NOTES_MIN_WIDTH = 80  # narrower terminals get the table without its notes column
PIPED_WIDTH = 80  # the table's width when stdout is not a terminal (| cat, CI logs) and COLUMNS is not set
# the stat that counts a stage's output rows, for stages that give no rows_out
OUT_KEYS = {"tag": "rows", "solve": "attempts", "train": "train"}
# completions per unit of a stage's bar, for the stages whose bar may move with the engine's finished
# completions before the rows are written (solve is not among them: several roles answer per query)
LIVE_STAGES = {"tag": 1, "sample": 1, "judge": 2, "eval": 1}

_generated = 0
_generated_lock = threading.Lock()


def generated(n: int = 1) -> None:
    """An engine finished ``n`` completions (called as they finish, mid-batch where the engine can tell):
    the bar of a stage in ``LIVE_STAGES`` moves before the stage writes their rows."""
    global _generated
    with _generated_lock:
        _generated += n


def generated_so_far() -> int:
    """Completions the engines of this process reported finished (``generated``)."""
    return _generated


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "row"):
    """A tqdm bar with count, rate and ETA; silent when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False,
                dynamic_ncols=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _tokens(st: dict) -> Optional[int]:
    tok = st.get("tokens")
    if isinstance(tok, dict):
        return sum(v for k, v in tok.items() if "completion" in k and isinstance(v, (int, float))) or None
    return tok if isinstance(tok, (int, float)) else None


def rows_out(stage: str, st: dict):
    """A stage's output rows: ``rows_out``, else the stat that counts them (tags written, solver attempts
    written, records trained on)."""
    return st.get("rows_out", st.get(OUT_KEYS.get(stage, "rows_out")))


def summary_rows(data: dict) -> list[tuple[str, ...]]:
    """(stage, rows in, rows out, seconds, tokens, notes) per stage; notes are the stage's scalar stats."""
    rows = []
    for stage, st in data.get("stages", {}).items():
        skip = {"rows_in", "rows_out", "seconds", "done", "tokens"}
        if "rows_out" not in st:
            skip.add(OUT_KEYS.get(stage, "rows_out"))  # shown as the out column
        notes = balance_notes(st) + [f"{k}={_fmt(v)}" for k, v in st.items()
                 if k not in skip and isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 40]
        for model, m in (st.get("models") or {}).items():  # the eval stage: headline figures per model
            if isinstance(m, dict):
                notes.append(f"{model}: valid={_fmt(m.get('template_validity'))} agree={_fmt(m.get('mode_agreement'))} "
                             f"think_on={_fmt(m.get('think_on_rate'))}")
        rejects = st.get("rejects")
        if isinstance(rejects, dict) and rejects:
            notes.append("rejects: " + ", ".join(f"{k} {v}" for k, v in rejects.items()))
        rows.append((stage, _fmt(st.get("rows_in")), _fmt(rows_out(stage, st)), _fmt(st.get("seconds")),
                     _fmt(_tokens(st)), "; ".join(notes[:8])))
    return rows


def balance_notes(st: dict) -> list[str]:
    """The assemble stage's label shares next to its records' shares, and who labelled / wrote them."""
    from katdata.balance import CONTENT_NAMES, LABEL_NAMES, mode_line, share_line

    notes = []
    if isinstance(st.get("labels"), dict) and isinstance(st.get("records_by_mode"), dict):
        notes.append(mode_line(st["labels"], st["records_by_mode"]).replace("exported", "records"))
    if isinstance(st.get("label_sources"), dict):
        notes.append("labels: " + share_line(st["label_sources"], LABEL_NAMES))
    if isinstance(st.get("content_sources"), dict):
        notes.append("content: " + share_line(st["content_sources"], CONTENT_NAMES))
    if st.get("imbalance_accepted"):
        notes.append("IMBALANCE ACCEPTED (assemble.accept_imbalance)")
    return notes


def shares_line(data: dict) -> Optional[str]:
    """The vote's label shares next to the exported mode shares (assemble and export stages)."""
    from katdata.balance import mode_line

    stages = data.get("stages", {})
    labels, export = stages.get("assemble", {}).get("labels"), stages.get("export", {})
    if not isinstance(labels, dict) or "on" not in export:
        return None
    line = "modes: " + mode_line(labels, {"on": export.get("on", 0), "off": export.get("off", 0)})
    return line + ("  (imbalance accepted)" if stages["assemble"].get("imbalance_accepted") else "")


def dataset_line(run_dir: Path) -> Optional[str]:
    """Mode ratio and vote pass rates of the final records."""
    from katdata.balance import CONTENT_NAMES, LABEL_NAMES, share_line

    path = RunFolder(run_dir).records
    if not path.is_file():
        return None
    modes, p_on, p_off, sources, labelled = Counter(), [], [], Counter(), Counter()
    for line in path.read_bytes().splitlines():  # bytes split on \n only: texts may hold U+2028
        rec = json.loads(line)
        modes[rec["mode"]] += 1
        sources[rec.get("content_source") or rec.get("provenance", {}).get("content_source") or "-"] += 1
        labelled[rec.get("label_source") or "-"] += 1
        p_on.append(rec.get("vote", {}).get("p_on", 0.0))
        p_off.append(rec.get("vote", {}).get("p_off", 0.0))
    n = sum(modes.values())
    if not n:
        return "records: 0"
    return (f"records: {n}  think-on {modes['on']} ({modes['on'] / n:.0%}) / think-off {modes['off']}  "
            f"mean pass rate on {sum(p_on) / n:.2f} / off {sum(p_off) / n:.2f}  "
            f"labels: {share_line(labelled, LABEL_NAMES)}  content: {share_line(sources, CONTENT_NAMES)}")


def _round_folders(data: dict, run_dir: Path) -> list[Path]:
    """This run and the rounds before it (``previous_round``, followed through each round's summary.json),
    oldest first; a previous round whose folder is gone ends the chain."""
    chain, seen, current = [Path(run_dir)], {Path(run_dir).resolve()}, data
    while True:
        prev = current.get("stages", {}).get("load", {}).get("copied_from")
        if not prev:
            break
        folder = Path(prev)
        if not (RunFolder(folder).votes).is_file() or folder.resolve() in seen:
            break
        seen.add(folder.resolve())
        chain.append(folder)
        try:
            current = json.loads((RunFolder(folder).summary).read_text("utf-8"))
        except (OSError, ValueError):
            break
    return chain[::-1]


def rounds_lines(data: dict, run_dir: Path) -> list[str]:
    """Per round of an iterated cold start: where the labels came from, the pass rates per mode, and how
    many labels changed since the round before. Empty for a run without ``previous_round``."""
    from katdata.balance import LABEL_NAMES, share_line

    folders = _round_folders(data, run_dir)
    if len(folders) < 2:
        return []
    out, before = [], None
    for i, folder in enumerate(folders, 1):
        path = RunFolder(folder).votes
        if not path.is_file():
            break
        votes = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        n = len(votes) or 1
        labels = {v["id"]: v.get("label") for v in votes}
        line = (f"round {i} ({folder}): labels {share_line(Counter(v.get('label_source') or '-' for v in votes), LABEL_NAMES)}"
                f"  mean pass rate on {sum(v.get('p_on') or 0 for v in votes) / n:.2f}"
                f" / off {sum(v.get('p_off') or 0 for v in votes) / n:.2f}")
        if before is not None:
            common = [q for q in labels if q in before]
            line += f"  labels changed since round {i - 1}: {sum(labels[q] != before[q] for q in common)} of {len(common)}"
        out.append(line)
        before = labels
    return out


def table_width() -> int:
    """The summary's width: ``COLUMNS`` when set, else the terminal's when stdout is one, else ``PIPED_WIDTH``."""
    import shutil

    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((PIPED_WIDTH, 24)).columns
    return PIPED_WIDTH


def _later_rounds(run_dir: Path, recipes: Path) -> list[Path]:
    """Recipes in ``recipes`` whose ``previous_round`` is this run folder and whose own folder is not made yet."""
    import yaml

    here, found = Path(run_dir).resolve(), []
    for path in sorted(recipes.glob("*.yaml")) if recipes.is_dir() else []:
        try:
            doc = yaml.safe_load(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        prev = doc.get("previous_round") if isinstance(doc, dict) else None
        if isinstance(prev, str) and Path(prev).resolve() == here:
            own = doc.get("run_dir")
            if not (isinstance(own, str) and Path(own.format(name=doc.get("name", ""))).exists()):
                found.append(path)
    return found


def next_steps(data: dict, run_dir: Path, recipes: Optional[Path] = None) -> list[tuple[str, str]]:
    """(command, what it does) for the commands that take what this run made further, its folder filled in
    (quoted for the shell where needed): human review of the records (not reviewed yet), the dataset to the
    Hub (exported, not pushed), the adapter behind a server, and the next round (a recipe in ``recipes``,
    default the packaged ones, whose ``previous_round`` is this folder and whose own folder is not made)."""
    from katdata.recipe_registry import RECIPES_DIR, command_arg

    run = shlex.quote(str(run_dir))
    steps = []
    if (RunFolder(run_dir).records).is_file() and not (run_dir / "review").exists():
        steps.append((f"katdata review push {run}", "human review in Argilla"))
    if (run_dir / "export").is_dir() and not data.get("stages", {}).get("export", {}).get("pushed"):
        steps.append((f"katdata export {run} --push-to-hub USER/NAME", "the dataset to the Hub"))
    if (run_dir / "train" / "adapter").is_dir():
        steps.append((f"katdata serve {run}", "the adapter behind an OpenAI-compatible server"))
        steps += [(f"katdata run {shlex.quote(command_arg(r))}", "the next round, with this adapter")
                  for r in _later_rounds(run_dir, recipes or RECIPES_DIR)]
    return steps


def print_summary(data: dict, run_dir: Path, wall_s: float) -> None:
    """The end-of-run table: counts, time and tokens per stage, then the dataset, where things are and
    the next commands.

    The table fits ``table_width()``: the notes wrap, and below ``NOTES_MIN_WIDTH`` columns they are
    left out (summary.json has them all).
    """
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    width = table_width()
    console = Console(width=width, markup=False, highlight=False)  # paths and notes are printed as they are
    notes = width >= NOTES_MIN_WIDTH
    table = Table(title=f"katdata run: {run_dir}  ({wall_s:.0f} s)")
    for col in ("stage", "in", "out", "seconds", "tokens"):
        table.add_column(col, no_wrap=True)
    if notes:
        table.add_column("notes", overflow="fold", ratio=1)
    for row in summary_rows(data):
        table.add_row(*(row if notes else row[:5]))
    console.print(table)
    if not notes:
        console.print(f"notes per stage: {run_dir / 'summary.json'}", soft_wrap=True)
    line = dataset_line(run_dir)
    if line:
        console.print(line)
    line = shares_line(data)
    if line:
        console.print(line)
    for line in rounds_lines(data, run_dir):
        console.print(line, soft_wrap=True)
    folder = RunFolder(run_dir)
    where = {"dataset": folder.export, "adapter": folder.adapter, "report": folder.eval / "eval.json"}
    for what, path in where.items():
        if path.exists():
            console.print(f"{what}: {path}", soft_wrap=True)  # a path stays whole, to copy
    steps = next_steps(data, run_dir)
    if steps:
        console.print("next:")
    for cmd, what in steps:  # a command stays whole on its line, to copy; its comment only where it fits
        line = f"  {cmd}   # {what}"
        console.print(line if cell_len(line) <= width else f"  {cmd}", soft_wrap=True)


class FileProgress:
    """A progress bar for a stage, fed by the rows it appends to its files (count, rate, ETA).

    A background thread reads the new complete lines every ``interval`` seconds and counts either
    distinct ids (``unit="query"``) or rows; nothing is shown when stderr is not a terminal. When the
    stage ends the bar takes its final count and stays on screen; a stage that ends normally below
    ``total`` (an upper bound, as for sampling) closes at ``n/n``, one that fails shows where it stopped.

    ``live`` (default: the stage named ``desc`` is in ``LIVE_STAGES``): between polls the bar also moves
    with the completions the engine reports finished (``generated``), ``live`` of them per unit, so a stage
    whose rows are all written when one batch comes back does not sit at 0% until then. That estimate never
    passes ``total``, and the rows written decide the final count.
    """

    def __init__(self, files: list[Path], total: Optional[int], desc: str, unit: str = "query",
                 interval: float = 0.5, enabled: Optional[bool] = None, file=None, live: Optional[int] = None):
        self.files, self.unit, self.interval = [Path(f) for f in files], unit, interval
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.live = LIVE_STAGES.get(desc) if live is None else live
        self._offsets = {f: 0 for f in self.files}  # rows already there (a resumed stage) count as done
        self._ids: set = set()
        self._rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = self.count() if self.enabled else 0  # a disabled bar reads nothing
        self._generated0 = generated_so_far()
        self.total = total
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=file, leave=True, dynamic_ncols=True,
                            initial=self._start)  # from the rows already there; the rate counts only new ones

    def shown(self) -> int:
        """What the bar shows now: the rows written, or more while the engine has finished completions whose
        rows are not written yet (``live``)."""
        n = self.count()
        if self.live:
            estimate = self._start + (generated_so_far() - self._generated0) // self.live
            n = max(n, min(estimate, self.total) if self.total else estimate)
        return n

    def count(self) -> int:
        """Read what was appended since the last call; returns the count so far."""
        for f in self.files:
            if not f.is_file():
                continue
            with open(f, "rb") as fh:
                fh.seek(self._offsets[f])
                data = fh.read()
            done = data[: data.rfind(b"\n") + 1]
            self._offsets[f] += len(done)
            for line in done.splitlines():
                self._rows += 1
                if self.unit == "query":
                    try:
                        self._ids.add(json.loads(line).get("id"))
                    except ValueError:
                        pass
        return len(self._ids) if self.unit == "query" else self._rows

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.bar.n = max(self.bar.n, self.shown())
            self.bar.refresh()

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self.bar.n = self.count()  # rows written since the last poll (a fast stage may write them all at once)
            if exc_type is None and self.bar.n != self.bar.total:
                self.bar.total = self.bar.n  # the stage did less than the most it could (sampling stopped early)
            self.bar.close()

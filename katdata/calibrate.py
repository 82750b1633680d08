"""The tagger calibrated against the vote (`katdata calibrate RUN_DIR`; also run at the end of the vote stage).

Outcomes are the vote's own decisions: queries whose two modes were both sampled and that have at
least one correct sample, labelled on (1) or off (0) by the vote's delta rule. Labels the vote fell
back to (the tagger's prior, review, dropped) are not outcomes, and an exploration row counts with
the label the vote evidence gave, not the random one.

Two fits of p(needs reasoning), both with scikit-learn:

- ``logistic``: a logistic regression on the tagger's features (its combined p, the LLM's own p, the
  rule prior's p and surface features, difficulty, domain and task type one-hot), standardized;
- ``isotonic``: an isotonic regression of the outcome on the tagger's combined p alone.

Both are scored by stratified k-fold cross-validation next to the raw tagger (agreement with the
vote labels at p = 0.5, Brier score, precision of the think-off candidates); the one with the lower
Brier score is used. ``calibration.json`` keeps both fits as plain numbers, so that applying one
(``tag.calibration``) needs neither scikit-learn nor numpy; ``calibration_reliability.png`` is the
reliability plot of the out-of-fold predictions.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from katdata.errors import KatdataError, RunFolderError, require
from katdata.records import Tags, Vote
from katdata.run_folder import FILES, RunFolder

log = logging.getLogger(__name__)

FIT_FILE = FILES["calibration"]
PLOT_FILE = FILES["calibration_plot"]
MIN_PER_CLASS = 3  # fewer vote-decided labels of either mode: no fit (nothing to cross-validate)
SURFACE = ("numbers", "operators", "math_notation", "code", "question", "multi_part", "reasoning_words")


def outcomes(run_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """({query id: 1 for on, 0 for off} decided by vote evidence, {excluded reason: count})."""
    from katdata.runfiles import read_rows
    from katdata.records import decide

    path = RunFolder(run_dir).votes
    if not path.is_file():
        raise RunFolderError(f"{path} not found: run the vote stage first")  # before anything in the folder changes
    out, skipped = {}, {"no correct sample (fallback label)": 0, "one mode not sampled": 0}
    for v in read_rows(path, Vote):
        if v.reason.startswith("no correct sample"):
            skipped["no correct sample (fallback label)"] += 1
        elif not (v.n_on and v.n_off):  # e.g. think-on skipped for the tagger's off candidates
            skipped["one mode not sampled"] += 1
        else:
            out[v.id] = int(decide(v.p_on, v.p_off, v.delta) == "on")
    return out, skipped


def raw_p(t: Tags) -> float:
    """The tagger's own p (before any calibration)."""
    return t.p_uncalibrated if t.p_uncalibrated is not None else t.p_reasoning


def feature_row(t: Tags, domains: list[str], task_types: list[str]) -> dict[str, float]:
    """The tagger's features of one query, by name (unknown labels: no one-hot set)."""
    rule = t.rule or {}
    surf = rule.get("features") or {}
    row = {"p_tagger": raw_p(t), "p_llm": t.p_llm if t.p_llm is not None else 0.5,
           "llm_p_missing": float(t.p_llm is None), "p_rule": float(rule.get("p_reasoning", raw_p(t))),
           "difficulty": float(t.difficulty), "log_words": math.log1p(float(surf.get("words", 0)))}
    row |= {f: min(float(surf.get(f, 0)), 6.0) for f in SURFACE}
    row |= {f"domain={d}": float(t.domain == d) for d in domains}
    row |= {f"task_type={k}": float(t.task_type == k) for k in task_types}
    return row


class Fit:
    """A saved calibration fit (calibration.json), applied without scikit-learn."""

    def __init__(self, data: dict, path: Path):
        self.data, self.path = data, path
        self.method = data["method"]

    def p(self, t: Tags) -> float:
        if self.method == "isotonic":
            return _interp(raw_p(t), self.data["isotonic"]["x"], self.data["isotonic"]["y"])
        lg = self.data["logistic"]
        x = feature_row(t, self.data["domains"], self.data["task_types"])
        z = lg["intercept"] + sum(c * (x.get(name, 0.0) - m) / s
                                  for name, c, m, s in zip(lg["features"], lg["coef"], lg["mean"], lg["scale"]))
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def apply(self, t: Tags, think_off_threshold: float) -> Tags:
        """The row with the calibrated p; the tagger's own p kept as p_uncalibrated."""
        p = round(self.p(t), 4)
        needs = p >= 0.5
        return t.model_copy(update={"p_uncalibrated": raw_p(t), "p_reasoning": p, "needs_reasoning": needs,
                                    "think_off_candidate": (not needs) and 1 - p >= think_off_threshold})

    def summary(self, rows: Iterable[Tags]) -> dict[str, Any]:
        """What the fit changed in a tag stage's rows (one pass; ``rows`` may be streamed)."""
        used = changed = 0
        for t in rows:
            if t.p_uncalibrated is not None:
                used += 1
                changed += (t.p_uncalibrated >= 0.5) != t.needs_reasoning
        return {"fit": str(self.path), "method": self.method, "fit_n": self.data["n"], "rows": used,
                "needs_reasoning_changed": changed}


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear interpolation, clipped at the ends (what IsotonicRegression.predict does)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def load_fit(path: str | Path) -> Fit:
    """Read a fit: calibration.json, or a run folder holding one; a clear error when it is unusable."""
    path = Path(path)
    file = path / FIT_FILE if path.is_dir() else path
    where = f"tag.calibration: {file}"
    if not file.is_file():
        raise KatdataError(f"{where}: not found (write it with `katdata calibrate RUN_DIR`)")
    try:
        data = json.loads(file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KatdataError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict) or "fitted" not in data:
        raise KatdataError(f"{where}: not a calibration file (no 'fitted' key)")
    if not data["fitted"]:
        raise KatdataError(f"{where}: holds no fit ({data.get('note', 'too few vote-decided labels')})")
    try:
        lg, iso = data["logistic"], data["isotonic"]
        sizes = {len(lg[k]) for k in ("features", "coef", "mean", "scale")}
        ok = (data["method"] in ("logistic", "isotonic") and len(sizes) == 1 and len(iso["x"]) == len(iso["y"]) > 0
              and isinstance(data["domains"], list) and isinstance(data["task_types"], list) and "n" in data)
        float(lg["intercept"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise KatdataError(f"{where}: malformed fit (method, logistic or isotonic fields)")
    return Fit(data, file)


# ---------------------------------------------------------------- fitting

def scores(y: list[int], p: list[float], think_off_threshold: float) -> dict[str, Any]:
    """Agreement with the vote labels at 0.5, Brier score, and how often a think-off candidate's vote said off."""
    n = len(y)
    cand = [yi for yi, pi in zip(y, p) if 1 - pi >= think_off_threshold]
    return {"agreement": round(sum((pi >= 0.5) == bool(yi) for yi, pi in zip(y, p)) / n, 4),
            "brier": round(sum((pi - yi) ** 2 for yi, pi in zip(y, p)) / n, 4),
            "think_off_candidates": len(cand),
            "think_off_precision": round(cand.count(0) / len(cand), 4) if cand else None}


def fit_run(run_dir: Path, folds: int = 5, seed: int = 0, think_off_threshold: float = 0.7,
            method: str = "auto", plot: bool = True) -> dict[str, Any]:
    """Fit, cross-validate and save calibration.json (and the plot) in ``run_dir``; returns the JSON."""
    from katdata.runfiles import read_rows

    run_dir = Path(run_dir)
    labels, skipped = outcomes(run_dir)
    (run_dir / PLOT_FILE).unlink(missing_ok=True)  # an earlier fit's plot would describe another fit
    tags_path = RunFolder(run_dir).tags
    tags = {t.id: t for t in read_rows(tags_path, Tags)} if tags_path.is_file() else {}
    skipped["no tags row"] = sum(1 for q in labels if q not in tags)
    ids = sorted(q for q in labels if q in tags)
    y = [labels[q] for q in ids]
    counts = {"on": sum(y), "off": len(y) - sum(y)}
    data: dict[str, Any] = {"fitted": False, "n": len(ids), "labels": counts, "excluded": skipped,
                            "outcome": "the vote's delta rule on queries with both modes sampled and a correct sample"}
    if min(counts.values()) < MIN_PER_CLASS:
        data["note"] = (f"too few vote-decided labels to fit and cross-validate: {counts['on']} on, "
                        f"{counts['off']} off (need {MIN_PER_CLASS} of each)")
        _write_json(run_dir / FIT_FILE, data)
        return data

    np = require("numpy", "local")
    sk = require("sklearn", "local")
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    rows = [tags[q] for q in ids]
    domains = sorted({t.domain for t in rows})
    task_types = sorted({t.task_type for t in rows})
    names = list(feature_row(rows[0], domains, task_types))
    X = np.array([[feature_row(t, domains, task_types)[k] for k in names] for t in rows])
    Y = np.array(y)
    P = np.array([raw_p(t) for t in rows])

    def fit_logistic(idx):
        scaler = StandardScaler().fit(X[idx])
        model = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X[idx]), Y[idx])
        return scaler, model

    def fit_isotonic(idx):
        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(P[idx], Y[idx])

    k = min(folds, min(counts.values()))
    oof = {"logistic": np.zeros(len(Y)), "isotonic": np.zeros(len(Y))}
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, Y):
        scaler, model = fit_logistic(train)
        oof["logistic"][test] = model.predict_proba(scaler.transform(X[test]))[:, 1]
        oof["isotonic"][test] = fit_isotonic(train).predict(P[test])
    cv = {"folds": k, "seed": seed, "think_off_threshold": think_off_threshold,
          "majority_share": round(max(counts.values()) / len(Y), 4),
          "raw": scores(y, P.tolist(), think_off_threshold)}
    for m in oof:
        cv[m] = scores(y, oof[m].tolist(), think_off_threshold)
    chosen = method if method != "auto" else min(("logistic", "isotonic"), key=lambda m: cv[m]["brier"])

    scaler, model = fit_logistic(np.arange(len(Y)))
    iso = fit_isotonic(np.arange(len(Y)))
    data |= {"fitted": True, "method": chosen, "domains": domains, "task_types": task_types, "cv": cv,
             "calibrated": cv[chosen],
             "logistic": {"features": names, "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
                          "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "C": 1.0},
             "isotonic": {"input": "p_tagger", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()},
             "sklearn": sk.__version__}
    if plot and reliability_plot(y, {"raw tagger": P.tolist(), f"calibrated ({chosen}, out-of-fold)":
                                     oof[chosen].tolist()}, run_dir / PLOT_FILE):
        data["plot"] = PLOT_FILE
    _write_json(run_dir / FIT_FILE, data)
    return data


def reliability_plot(y: list[int], preds: dict[str, list[float]], path: Path, bins: int = 5) -> bool:
    """Observed think-on share against predicted p, per equal-width bin; point size = rows in the bin."""
    try:
        matplotlib = require("matplotlib", "local")
    except KatdataError as exc:
        log.warning("no reliability plot: %s", exc)
        return False
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, p in preds.items():
        xs, ys, ns = [], [], []
        for b in range(bins):
            sel = [(pi, yi) for pi, yi in zip(p, y) if min(int(pi * bins), bins - 1) == b]
            if sel:
                xs.append(sum(s[0] for s in sel) / len(sel))
                ys.append(sum(s[1] for s in sel) / len(sel))
                ns.append(len(sel))
        ax.plot(xs, ys, marker="o", label=name)
        ax.scatter(xs, ys, s=[12 + 6 * n for n in ns], alpha=0.35)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="predicted p(needs reasoning)",
           ylabel="vote said think-on (share)", title=f"Tagger reliability against the vote (n={len(y)})")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), "utf-8")
    os.replace(tmp, path)


def after_vote(run_dir: Path, think_off_threshold: float) -> dict[str, Any]:
    """The vote stage's epilogue: fit when scikit-learn is there; a short summary for summary.json."""
    try:
        data = fit_run(run_dir, think_off_threshold=think_off_threshold)
    except KatdataError as exc:  # scikit-learn not installed: the vote itself is done, say why there is no fit
        log.warning("no tagger calibration: %s", exc)
        return {"fitted": False, "note": str(exc)}
    out = {k: data[k] for k in ("fitted", "n", "labels", "note", "method") if k in data}
    if data["fitted"]:
        out["cv_agreement"] = {m: data["cv"][m]["agreement"] for m in ("raw", data["method"])}
    return out


# ---------------------------------------------------------------- the card

def card_lines(run_dir: Path) -> list[str]:
    """The card's calibration section (empty when the run has no calibration.json)."""
    path = Path(run_dir) / FIT_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text("utf-8"))
    out = ["## Tagger calibration", ""]
    if not data.get("fitted"):
        return out + [f"No fit: {data.get('note', 'too few vote-decided labels')}.", ""]
    cv = data["cv"]
    rows = [[name, cv[m]["agreement"], cv[m]["brier"], cv[m]["think_off_candidates"],
             "-" if cv[m]["think_off_precision"] is None else cv[m]["think_off_precision"]]
            for name, m in (("raw tagger", "raw"), ("logistic", "logistic"), ("isotonic", "isotonic"))]
    out += [f"p(needs reasoning) fitted to {data['n']} vote-decided labels ({data['labels']['on']} on, "
            f"{data['labels']['off']} off); {cv['folds']}-fold cross-validated, majority share "
            f"{cv['majority_share']}. Used: {data['method']}.", "",
            "| tagger | CV agreement | Brier | think-off candidates | of those, vote said off |",
            "| --- | --- | --- | --- | --- |"] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
    if data.get("plot"):
        out += [f"![Tagger reliability]({data['plot']})", ""]
    return out


def copy_plot(run_dir: Path, folder: Path) -> None:
    """Put the run's reliability plot next to the card."""
    if (Path(run_dir) / PLOT_FILE).is_file():
        shutil.copyfile(Path(run_dir) / PLOT_FILE, Path(folder) / PLOT_FILE)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="katdata calibrate",
                                 description="Fit the tagger's p(needs reasoning) to a run's vote outcomes.")
    ap.add_argument("run_dir", type=Path, help="a run folder with tags.jsonl and votes.jsonl (writes calibration.json)")
    ap.add_argument("--method", choices=["auto", "logistic", "isotonic"], default="auto",
                    help="fit used by `tag.calibration` (auto: lower cross-validated Brier score)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (fewer when a mode has fewer rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.7,
                    help="think-off candidate threshold (tag.think_off_threshold)")
    args = ap.parse_args(argv)
    if args.folds < 2:
        raise KatdataError("--folds: at least 2")
    from katdata.preflight import run_folder

    run_folder(args.run_dir, "calibrate")  # it writes calibration.json and the plot into a run folder, nowhere else
    data = fit_run(args.run_dir, args.folds, args.seed, args.threshold, args.method)
    print(json.dumps({k: data[k] for k in ("fitted", "n", "labels", "excluded", "note", "method", "cv")
                      if k in data}, indent=1))
    print(f"wrote {args.run_dir / FIT_FILE}")
    return 0

"""Benchmark rows -> figures, terminal tables, a model-card section and an accuracy-against-tokens plot.

A row is one sample of one benchmark item (see katdata.benchmarks): benchmark, model, setting (auto / on / off),
id, sample, k, tokens, prompt_tokens, ok, finish_reason, mode, correct (True / False / None) and answer_key.
Everything here is pure Python except :func:`plot`, which needs matplotlib (the 'local' extra).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Optional

from katdata.eval_items import counted_tokens

SETTING_ORDER = ("auto", "on", "off")
MARKERS = {"auto": "o", "on": "^", "off": "v"}
COLUMNS = (("model", 8), ("setting", 7), ("pass@1", 6), ("pass@k", 6), ("maj@k", 6), ("think-on", 8),
           ("mean tok", 8), ("p90 tok", 8), ("valid", 6), ("cut", 6))
_KEYS = ("pass@1", "pass@k", "maj@k", "think_on_rate", "mean_tokens", "p90_tokens", "template_validity", "truncated")
_RATES = {"pass@1", "pass@k", "maj@k", "think_on_rate", "template_validity", "truncated"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (n={n}, k={k})")
    if c < 0 or c > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(rows_of_one_item: list[dict]) -> bool:
    """Whether the majority answer of one item's samples is correct.

    Rows whose answer_key is None do not vote; a tie goes to the key whose earliest sample comes first; the
    winning key counts as correct when any row with that key is correct. No voting key at all gives False.
    """
    votes: dict[str, list] = {}  # key -> [count, first sample, any correct]
    for row in rows_of_one_item:
        key = row.get("answer_key")
        if key is None:
            continue
        vote = votes.setdefault(key, [0, row.get("sample", 0), False])
        vote[0] += 1
        vote[1] = min(vote[1], row.get("sample", 0))
        vote[2] = vote[2] or row.get("correct") is True
    if not votes:
        return False
    return max(votes.values(), key=lambda v: (v[0], -v[1]))[2]


def percentile(xs, q) -> Optional[float]:
    """The q-th percentile (0..100) of xs, interpolated linearly like numpy's default; None when xs is empty."""
    values = sorted(xs)
    if not values:
        return None
    pos = (len(values) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return float(values[low] + (values[high] - values[low]) * (pos - low))


def _ordered_settings(settings) -> list[str]:
    known = [s for s in SETTING_ORDER if s in settings]
    return known + [s for s in settings if s not in SETTING_ORDER]


def _counted_tokens(row: dict, auto_prompts: dict) -> int:
    """A reply's tokens with the judge included: forced prompts pre-fill the judge, so add what they pre-fill."""
    if row["setting"] == "auto":
        return row["tokens"]
    base = (row["benchmark"], row["model"], row["id"])
    auto_prompt = auto_prompts.get(base + (row["sample"],), auto_prompts.get(base))
    if auto_prompt is None:
        return row["tokens"]
    return counted_tokens(row["tokens"], row["prompt_tokens"], auto_prompt)


def _cell(rows: list[dict], auto_prompts: dict) -> dict:
    """The figures of one (benchmark, model, setting) group."""
    items: dict[str, list[dict]] = {}
    for row in rows:
        items.setdefault(row["id"], []).append(row)
    k = max(row["k"] for row in rows)
    per_item = list(items.values())
    correct = [sum(1 for r in item if r.get("correct") is True) for item in per_item]
    # an item with fewer than k samples (a failed sample dropped) is scored at k = its sample count
    pass_k = [pass_at_k(len(item), c, min(k, len(item))) for item, c in zip(per_item, correct)]
    modes = [r.get("mode") for r in rows if r.get("mode") is not None]
    tokens = [_counted_tokens(r, auto_prompts) for r in rows]
    return {
        "items": len(items), "k": k, "samples": len(rows),
        "pass@1": round(sum(c / len(item) for item, c in zip(per_item, correct)) / len(per_item), 4),
        "pass@k": round(sum(pass_k) / len(pass_k), 4),
        "maj@k": round(sum(1 for item in per_item if maj_at_k(item)) / len(per_item), 4),
        "think_on_rate": round(sum(1 for m in modes if m == "on") / len(modes), 4) if modes else None,
        "mean_tokens": round(sum(tokens) / len(tokens), 1), "p90_tokens": round(percentile(tokens, 90), 1),
        "template_validity": round(sum(1 for r in rows if r.get("ok")) / len(rows), 4),
        "truncated": round(sum(1 for r in rows if r.get("finish_reason") == "length") / len(rows), 4),
        "unverified": sum(1 for r in rows if r.get("correct") is None),
    }


def figures(rows: list[dict]) -> dict:
    """{benchmark: {"models": {model: {setting: cell}}, "token_saving": {model: saving}}} (see the module doc).

    Benchmarks and models keep the order they first appear in; settings are ordered auto, on, off.
    token_saving compares a model's auto and forced think-on cells: saving = 1 - auto / on mean tokens.
    """
    auto_prompts: dict[tuple, int] = {}
    groups: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for row in rows:
        if row["setting"] == "auto":
            base = (row["benchmark"], row["model"], row["id"])
            auto_prompts.setdefault(base + (row["sample"],), row["prompt_tokens"])
            auto_prompts.setdefault(base, row["prompt_tokens"])
        models = groups.setdefault(row["benchmark"], {})
        models.setdefault(row["model"], {}).setdefault(row["setting"], []).append(row)
    out = {}
    for bench, models in groups.items():
        cells, saving = {}, {}
        for model, settings in models.items():
            cells[model] = {s: _cell(settings[s], auto_prompts) for s in _ordered_settings(settings)}
            auto, on = cells[model].get("auto"), cells[model].get("on")
            if auto and on:
                saving[model] = {
                    "saving": round(1 - auto["mean_tokens"] / on["mean_tokens"], 4) if on["mean_tokens"] else None,
                    "mean_tokens_auto": auto["mean_tokens"], "mean_tokens_on": on["mean_tokens"],
                    "pass@1_auto": auto["pass@1"], "pass@1_on": on["pass@1"],
                }
        out[bench] = {"models": cells, "token_saving": saving}
    return out


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in _RATES:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}"


def _rows(bench: dict) -> list[list[str]]:
    """One list of column strings per model x setting."""
    return [[model, setting] + [_fmt(key, cell[key]) for key in _KEYS]
            for model, settings in bench["models"].items() for setting, cell in settings.items()]


def _title(name: str, bench: dict) -> str:
    cells = [c for settings in bench["models"].values() for c in settings.values()]
    items = max((c["items"] for c in cells), default=0)
    ks = sorted({c["k"] for c in cells})
    return f"{name}: {items} item{'' if items == 1 else 's'}, k={'/'.join(str(k) for k in ks) or '-'}"


def _saving_lines(bench: dict) -> list[str]:
    lines = []
    for model, s in bench["token_saving"].items():
        if s["saving"] is None:
            lines.append(f"{model}: no token saving figure (forced think-on used no tokens)")
            continue
        lines.append(f"{model}: auto uses {100 * abs(s['saving']):.1f}% {'fewer' if s['saving'] >= 0 else 'more'}"
                     f" tokens than forced think-on (pass@1 {_fmt('pass@1', s['pass@1_auto'])} against "
                     f"{_fmt('pass@1', s['pass@1_on'])})")
    return lines


def table_lines(name: str, bench: dict) -> list[str]:
    """A plain-text table of one benchmark (figures(...)[name]), then one token-saving line per model.

    Rows fit in 80 columns for model names up to 8 characters; a saving line longer than 80 columns has its
    pass@1 comparison moved onto an indented second line.
    """
    body = _rows(bench)
    widths = [max([w] + [len(r[i]) for r in body]) for i, (_, w) in enumerate(COLUMNS)]

    def line(cols):
        return " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()

    lines = [_title(name, bench), line([h for h, _ in COLUMNS])] + [line(r) for r in body]
    for text in _saving_lines(bench):
        if len(text) > 80 and " (" in text:
            head, tail = text.split(" (", 1)
            lines += [head, "  (" + tail]
        else:
            lines.append(text)
    return lines


def card_lines(figs: dict, plot_name: Optional[str]) -> list[str]:
    """The Markdown "## Benchmarks" section of a model card: one table per benchmark, then the plot link."""
    lines = ["## Benchmarks", "",
             "pass@1 is the mean accuracy over the k samples drawn per item; pass@k is the unbiased estimator of "
             "Chen et al. (2021); maj@k scores the majority-vote answer of the k samples; think-on is the share of "
             "replies that chose think-on mode; token counts include the judge rationale (for forced think-on/off "
             "settings, the pre-filled judge and mode line are added); valid is the share of replies with a valid "
             "template and cut the share truncated at the length limit.", ""]
    for name, bench in figs.items():
        lines += [f"### {_title(name, bench)}", "",
                  "| " + " | ".join(h for h, _ in COLUMNS) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in _rows(bench)]
        saving = _saving_lines(bench)
        lines += ([""] + [f"- {s}" for s in saving] if saving else []) + [""]
    if plot_name:
        lines += [f"![accuracy against tokens]({plot_name})", ""]
    return lines


def plot(figs: dict, out: pathlib.Path) -> str:
    """Write out/benchmarks.png: per benchmark, pass@1 against mean counted tokens, one marker per model x setting.

    Colour marks the model, marker shape the setting (auto o, on ^, off v). Returns "benchmarks.png".
    """
    from katdata.errors import require
    matplotlib = require("matplotlib", "local")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out)
    names = list(figs) or ["(no benchmarks)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    models = list(dict.fromkeys(m for bench in figs.values() for m in bench["models"]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    try:
        for ax, name in zip(axes[0], names):
            for model, settings in figs.get(name, {}).get("models", {}).items():
                for setting, cell in settings.items():
                    if cell["mean_tokens"] is None or cell["pass@1"] is None:
                        continue
                    ax.plot([cell["mean_tokens"]], [cell["pass@1"]], linestyle="none", clip_on=False,
                            marker=MARKERS.get(setting, "s"), color=colours[model], markersize=8,
                            label=f"{model} {setting}")
            ax.set_title(name)
            ax.set_xlabel("mean tokens (judge included)")
            ax.set_ylabel("pass@1")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.tight_layout()
        tmp = out / ".benchmarks.tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out / "benchmarks.png")
    finally:
        plt.close(fig)
    return "benchmarks.png"

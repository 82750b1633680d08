"""katdata.bench_figures: pass@k, maj@k, percentiles, figures, tables, card lines and the plot."""

from __future__ import annotations

import itertools
import math

import pytest

from katdata import bench_figures as bf


def row(bench, model, setting, id_, sample, tokens, prompt_tokens, correct, key, mode="default", ok=True,
        finish="stop", k=2):
    return {"benchmark": bench, "model": model, "setting": setting, "id": id_, "sample": sample, "k": k,
            "tokens": tokens, "prompt_tokens": prompt_tokens, "ok": ok, "finish_reason": finish,
            "mode": setting if mode == "default" else mode, "correct": correct, "answer_key": key}


def sample_rows() -> list[dict]:
    """Two benchmarks (math first), models adapted / base / rl, settings in a scrambled order, k = 2."""
    m, g = "math", "gsm8k"
    return [
        # math, model rl: off before auto in the rows, no "on" cell
        row(m, "rl", "off", "x", 0, 5, 30, False, "b"),
        row(m, "rl", "off", "x", 1, 5, 30, False, "b"),
        row(m, "rl", "auto", "x", 0, 40, 10, None, None, mode=None, ok=False),
        row(m, "rl", "auto", "x", 1, 60, 10, True, "a", mode="off"),
        # gsm8k, adapted: forced think-on
        row(g, "adapted", "on", "a", 0, 200, 80, True, "1"),
        row(g, "adapted", "on", "a", 1, 180, 80, True, "1"),
        row(g, "adapted", "on", "b", 0, 150, 90, False, "4"),
        row(g, "adapted", "on", "b", 1, 100, 90, True, "5"),
        # gsm8k, adapted: auto
        row(g, "adapted", "auto", "a", 0, 100, 50, True, "1", mode="on"),
        row(g, "adapted", "auto", "a", 1, 20, 50, False, "2", mode="off"),
        row(g, "adapted", "auto", "b", 0, 30, 60, False, "3", mode="off", ok=False, finish="length"),
        row(g, "adapted", "auto", "b", 1, 50, 60, None, None, mode="on"),
        # gsm8k, adapted: forced think-off; item c has no auto row
        row(g, "adapted", "off", "a", 0, 10, 40, False, "9"),
        row(g, "adapted", "off", "a", 1, 10, 80, False, "9"),
        row(g, "adapted", "off", "c", 0, 7, 100, True, "8"),
        row(g, "adapted", "off", "c", 1, 9, 100, False, "6"),
        # gsm8k, base: auto has only sample 0 of item a; the on rows fall back to it
        row(g, "base", "on", "a", 0, 100, 70, True, "7"),
        row(g, "base", "on", "a", 1, 100, 70, False, "6"),
        row(g, "base", "auto", "a", 0, 300, 50, True, "7", mode="off"),
    ]


# --- pass@k ---------------------------------------------------------------------------------------------

def brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(1 for s in subsets if any(s)) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert bf.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert bf.pass_at_k(5, 0, 3) == 0.0
    assert bf.pass_at_k(5, 3, 3) == 1.0  # n - c < k
    assert bf.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert bf.pass_at_k(200, 10, 1) == pytest.approx(10 / 200)
    assert bf.pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    for n, c, k in [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, 1, -1)]:
        with pytest.raises(ValueError):
            bf.pass_at_k(n, c, k)


# --- maj@k ----------------------------------------------------------------------------------------------

def item(*samples):
    return [{"sample": i, "answer_key": key, "correct": ok} for i, key, ok in samples]


def test_maj_at_k_majority_and_ties():
    assert bf.maj_at_k(item((0, "a", False), (1, "b", True), (2, "b", True))) is True
    assert bf.maj_at_k(item((0, "a", True), (1, "b", False), (2, "b", False))) is False
    # tie: the key whose first sample comes first wins, whatever the row order
    assert bf.maj_at_k(item((1, "b", True), (0, "a", False), (2, "b", True), (3, "a", False))) is False
    assert bf.maj_at_k(item((3, "b", False), (0, "a", True), (1, "b", False), (2, "a", None))) is True
    # the winning key is correct when any of its rows is correct
    assert bf.maj_at_k(item((0, "a", None), (1, "a", True), (2, "b", False))) is True


def test_maj_at_k_none_keys():
    # None keys do not vote, even when they outnumber the rest
    assert bf.maj_at_k(item((0, None, False), (1, None, False), (2, "a", True))) is True
    assert bf.maj_at_k(item((0, None, True), (1, None, True))) is False
    assert bf.maj_at_k([]) is False


# --- percentile -----------------------------------------------------------------------------------------

def test_percentile_like_numpy():
    assert bf.percentile([], 90) is None
    assert bf.percentile([7], 90) == 7.0
    assert bf.percentile([100, 20, 50, 30], 90) == pytest.approx(85.0)
    assert bf.percentile([1, 2, 3, 4, 5], 50) == 3.0
    assert bf.percentile([1, 2, 3, 4], 50) == 2.5
    assert bf.percentile([3, 1, 2], 0) == 1.0
    assert bf.percentile([3, 1, 2], 100) == 3.0


# --- figures --------------------------------------------------------------------------------------------

def test_figures_order():
    figs = bf.figures(sample_rows())
    assert list(figs) == ["math", "gsm8k"]
    assert list(figs["gsm8k"]["models"]) == ["adapted", "base"]
    assert list(figs["gsm8k"]["models"]["adapted"]) == ["auto", "on", "off"]
    assert list(figs["math"]["models"]["rl"]) == ["auto", "off"]
    assert figs["math"]["token_saving"] == {}


def test_figures_auto_cell():
    cell = bf.figures(sample_rows())["gsm8k"]["models"]["adapted"]["auto"]
    assert cell == {
        "items": 2, "k": 2, "samples": 4,
        "pass@1": 0.25,          # item a 1/2, item b 0/2 (None counts as not correct)
        "pass@k": 0.5,           # item a 1.0, item b 0.0
        "maj@k": 0.5,            # a: tie 1/2 -> key "1" (sample 0) correct; b: "3" wrong (None key no vote)
        "think_on_rate": 0.5,
        "mean_tokens": 50.0, "p90_tokens": 85.0,
        "template_validity": 0.75, "truncated": 0.25, "unverified": 1,
    }


def test_figures_forced_cells_count_the_judge():
    models = bf.figures(sample_rows())["gsm8k"]["models"]
    on = models["adapted"]["on"]
    # counted tokens 200+30, 180+30, 150+30, 100+30 = 230, 210, 180, 130
    assert on["mean_tokens"] == 187.5
    assert on["p90_tokens"] == pytest.approx(224.0)
    assert (on["pass@1"], on["pass@k"], on["maj@k"], on["think_on_rate"]) == (0.75, 1.0, 0.5, 1.0)
    off = models["adapted"]["off"]
    # a0: prompt shorter than auto's -> +0; a1: +30; item c has no auto row -> tokens only
    assert off["mean_tokens"] == round((10 + 40 + 7 + 9) / 4, 1)
    assert off["think_on_rate"] == 0.0
    assert (off["pass@1"], off["pass@k"], off["maj@k"], off["items"]) == (0.25, 0.5, 0.5, 2)
    # base: auto has sample 0 only; on sample 1 uses it too (+20 each)
    assert models["base"]["on"]["mean_tokens"] == 120.0
    assert models["base"]["auto"]["pass@k"] == 1.0  # one sample of k=2: scored at k = 1
    rl = bf.figures(sample_rows())["math"]["models"]["rl"]
    assert rl["auto"]["think_on_rate"] == 0.0 and rl["auto"]["unverified"] == 1
    assert rl["auto"]["maj@k"] == 1.0 and rl["auto"]["template_validity"] == 0.5
    assert rl["off"]["mean_tokens"] == 25.0


def test_figures_think_on_rate_none_without_modes():
    rows = [row("t", "m", "auto", "a", 0, 10, 5, True, "1", mode=None)]
    assert bf.figures(rows)["t"]["models"]["m"]["auto"]["think_on_rate"] is None


def test_figures_token_saving():
    saving = bf.figures(sample_rows())["gsm8k"]["token_saving"]
    assert saving["adapted"] == {"saving": round(1 - 50 / 187.5, 4), "mean_tokens_auto": 50.0,
                                 "mean_tokens_on": 187.5, "pass@1_auto": 0.25, "pass@1_on": 0.75}
    assert saving["base"]["saving"] == -1.5
    zero = [row("t", "m", "auto", "a", 0, 10, 5, True, "1"), row("t", "m", "on", "a", 0, 0, 5, True, "1")]
    assert bf.figures(zero)["t"]["token_saving"]["m"]["saving"] is None


# --- table, card, plot ----------------------------------------------------------------------------------

def test_table_lines():
    figs = bf.figures(sample_rows())
    lines = bf.table_lines("gsm8k", figs["gsm8k"])
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith("gsm8k") and "2 items" in lines[0] and "k=2" in lines[0]
    for header in ("model", "setting", "pass@1", "pass@k", "maj@k", "think-on", "mean tok", "p90 tok", "valid",
                   "cut"):
        assert header in lines[1]
    auto = next(line for line in lines if line.split()[:2] == ["adapted", "auto"])
    assert auto.split()[2:] == ["25.0%", "50.0%", "50.0%", "50.0%", "50.0", "85.0", "75.0%", "25.0%"]
    assert sum(1 for line in lines if line.split()[:1] in (["adapted"], ["base"])) == 5
    text = " ".join(lines)
    assert "adapted: auto uses 73.3% fewer tokens than forced think-on" in text
    assert "(pass@1 25.0% against 75.0%)" in text
    assert "base: auto uses 150.0% more tokens than forced think-on" in text
    rl = bf.table_lines("math", figs["math"])
    assert "-" not in rl[0] and len(rl) == 4  # no saving lines without an "on" cell


def test_table_lines_none_and_long_names_fit():
    rows = [row("t", "longname", s, "a", i, 12345, 5, True, "1", mode=None if s == "auto" else s, finish="length")
            for s in ("auto", "on", "off") for i in (0, 1)]
    lines = bf.table_lines("t", bf.figures(rows)["t"])
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    auto = next(line for line in lines if line.split()[:2] == ["longname", "auto"])
    assert auto.split()[5] == "-" and auto.split()[-1] == "100.0%"


def test_card_lines():
    figs = bf.figures(sample_rows())
    lines = bf.card_lines(figs, "benchmarks.png")
    text = "\n".join(lines)
    assert lines[0] == "## Benchmarks"
    assert "pass@1" in text and "unbiased" in text and "majority" in text and "judge" in text
    headers = [i for i, line in enumerate(lines) if line.startswith("| model | setting | pass@1")]
    assert len(headers) == 2
    for i in headers:
        assert lines[i + 1].startswith("|---")
    assert "| adapted | auto | 25.0% | 50.0% | 50.0% | 50.0% | 50.0 | 85.0 | 75.0% | 25.0% |" in lines
    assert text.index("### math") < text.index("### gsm8k")
    assert "![accuracy against tokens](benchmarks.png)" in lines
    assert not any("![" in line for line in bf.card_lines(figs, None))


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    name = bf.plot(bf.figures(sample_rows()), tmp_path)
    assert name == "benchmarks.png"
    assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks.png"]

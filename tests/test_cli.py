"""The CLI: template commands, model path, import hygiene."""

import json
import subprocess
import sys

from katdata.cli import main
from katdata.template import render

ON = render("on", "Needs steps.", "4", think="2+2=4")


def test_template_render_and_parse(capsys, tmp_path):
    assert main(["template", "render", "--mode", "on", "--judge", "Needs steps.", "--think", "2+2=4", "--answer", "4"]) == 0
    assert capsys.readouterr().out == ON
    f = tmp_path / "r.txt"
    f.write_text(ON[len("<judge>\n"):] + "<|im_end|>")
    assert main(["template", "parse", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": True, "mode": "on", "judge": "Needs steps.", "think": "2+2=4", "answer": "4",
                   "truncated": False, "errors": []}


def test_template_parse_stdin():
    proc = subprocess.run([sys.executable, "-m", "katdata", "template", "parse", "-"], input="no tags at all",
                          capture_output=True, text=True)
    assert proc.returncode == 1  # an invalid response: the check failed
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["mode"] is None and "missing_judge" in out["errors"]


def test_template_validate_counts_and_exit_code(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"response": ON}) + "\n")
    assert main(["template", "validate", str(good)]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": ON}) + "\n" + json.dumps({"response": ON + " more"}) + "\n"
                   + json.dumps({"response": ON[:-30]}) + "\n")
    capsys.readouterr()
    assert main(["template", "validate", str(bad)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 3 and out["invalid"] == 2
    assert out["errors"]["text_after_answer"] == 1 and out["errors"]["truncated"] == 1
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"text": ON}) + "\n")
    assert main(["template", "validate", str(missing)]) == 2
    assert "m.jsonl:1 field 'response'" in capsys.readouterr().err


def test_chat_template_command(capsys):
    assert main(["template", "chat-template", "--training"]) == 0
    assert "{%- generation -%}" in capsys.readouterr().out


def test_import_and_help_load_nothing_heavy():
    code = ("import sys, katdata, katdata.cli, katdata.recipe, katdata.pipeline\n"
            "from katdata.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'datasets', 'argilla', 'peft', 'trl') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    proc = subprocess.run([sys.executable, "-m", "katdata", "--help"], capture_output=True, text=True, check=True)
    assert all(f"    {cmd} " in proc.stdout for cmd in ("template", "run", "validate", "ls", "cp"))


def test_missing_extra_names_the_extra(monkeypatch):
    import pytest

    from katdata.errors import KatdataError, require

    monkeypatch.setitem(sys.modules, "argilla", None)  # as if not installed
    with pytest.raises(KatdataError, match=r"katdata\[review\]"):
        require("argilla", "review")

"""Every command that writes a path the user gives (issue 23 §1): katdata replaces or writes into only a folder it
made itself; anything else is refused with one line on stderr (exit 3) and left exactly as it was.

Through the real CLI (``katdata.cli.main``), on a small run folder of real records (tests/demo_data.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from demo_data import demo_records

from katdata import output_paths
from katdata.cli import main
from katdata.errors import RunFolderError
from katdata.runfiles import RowWriter


@pytest.fixture(scope="module")
def records():
    return demo_records(4, 4)


@pytest.fixture
def run(tmp_path, records) -> Path:
    return make_run(tmp_path / "run", records)


def make_run(path: Path, records, summary: bool = True) -> Path:
    path.mkdir(parents=True)
    with RowWriter(path / "records.jsonl") as w:
        w.write_all(records)
    if summary:
        (path / "summary.json").write_text('{"stages": {}}')
    return path


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (hidden ones too): file bytes, link targets, folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        out[key] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refused(capsys, argv: list[str], root: Path, *texts: str) -> str:
    """``katdata ARGV`` exits 3 with one line holding ``texts``, and nothing under ``root`` changed."""
    before = snapshot(root)
    assert main(argv) == 3
    line = error_line(capsys)
    for text in texts:
        assert text in line, line
    assert "nothing was written" in line, line
    assert snapshot(root) == before
    return line


# ---------------------------------------------------------------- katdata export --out


def test_export_refuses_a_users_folder(tmp_path, run, capsys):
    mine = user_folder(tmp_path / "mine")
    line = refused(capsys, ["export", str(run), "--out", str(mine)], tmp_path,
                   f"--out {mine}: a folder katdata did not write", output_paths.MARKER)
    assert line.startswith("katdata export: error: ")


def test_export_refuses_a_file_without_a_traceback(tmp_path, run, capsys):
    (tmp_path / "afile.parquet").write_bytes(b"PAR1 my data")
    refused(capsys, ["export", str(run), "--out", str(tmp_path / "afile.parquet")], tmp_path, "afile.parquet: a file")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .afile.old-PID, no temp folder


def test_export_refuses_the_run_folder_and_its_ancestors(tmp_path, run, capsys, monkeypatch):
    refused(capsys, ["export", str(run), "--out", str(run)], tmp_path, "the run folder itself")
    refused(capsys, ["export", str(run), "--out", str(tmp_path)], tmp_path, "contains the run folder")
    monkeypatch.chdir(run)  # the same folders spelt relative to where the user stands
    refused(capsys, ["export", ".", "--out", ".."], tmp_path, "--out ..: contains the run folder")
    refused(capsys, ["export", ".", "--out", "../run/."], tmp_path, "the run folder itself")


@pytest.mark.parametrize("inside", ["sub", "records.jsonl", "export/data", "cache"])
def test_export_refuses_paths_inside_the_run_folder_other_than_export(tmp_path, run, capsys, inside):
    (run / "cache").mkdir()
    refused(capsys, ["export", str(run), "--out", str(run / inside)], tmp_path,
            f"where export writes only {run / 'export'}")


def test_export_refuses_a_symlink_and_a_path_under_a_file(tmp_path, run, capsys):
    mine = user_folder(tmp_path / "mine")
    (tmp_path / "link").symlink_to(mine)
    refused(capsys, ["export", str(run), "--out", str(tmp_path / "link")], tmp_path, "a symbolic link")
    (tmp_path / "afile").write_text("x")
    refused(capsys, ["export", str(run), "--out", str(tmp_path / "afile" / "ds")], tmp_path, "is a file, not a folder")


def test_export_refuses_another_runs_folders(tmp_path, run, records, capsys):
    other = make_run(tmp_path / "other", records)
    assert main(["export", str(other)]) == 0
    capsys.readouterr()
    refused(capsys, ["export", str(run), "--out", str(other / "export")], tmp_path, "inside the run folder", "another run")
    (other / "summary.json").unlink()  # a run folder from before summary.json: its export's manifest still names it
    refused(capsys, ["export", str(run), "--out", str(other / "export")], tmp_path, "the export of another run folder")


def test_export_replaces_its_own_export_and_only_while_it_holds_nothing_else(tmp_path, run, capsys):
    out = tmp_path / "datasets" / "kat"
    assert main(["export", str(run), "--out", str(out)]) == 0
    manifest = json.loads((out / output_paths.MARKER).read_text())
    assert manifest["kind"] == "export" and manifest["run_dir"] == str(run.resolve()) and manifest["format"] == "hf"
    assert "README.md" in manifest["files"] and any(f.startswith("data/train-") for f in manifest["files"])

    assert main(["export", str(run), "--out", str(out), "--format", "llamafactory"]) == 0  # replaced
    assert (out / "dataset_info.json").is_file() and not list((out / "data").glob("*.parquet"))
    assert json.loads((out / output_paths.MARKER).read_text())["format"] == "llamafactory"
    assert sorted(p.name for p in out.parent.iterdir()) == ["kat"]  # no .kat.old-PID, no temp folder left
    capsys.readouterr()

    (out / "data" / "my-notes.txt").write_text("keep me")  # the user put something of theirs in it
    refused(capsys, ["export", str(run), "--out", str(out)], tmp_path, "holds data/my-notes.txt",
            "export did not write", "move it out first")


def test_export_uses_an_empty_folder(tmp_path, run, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "README.md").is_file() and (tmp_path / "empty" / output_paths.MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_default_export_folder_of_an_older_run(tmp_path, run, capsys):
    """RUN/export made before the marker (README.md, data/) is replaced; RUN/export holding the user's files is not."""
    (run / "export" / "data").mkdir(parents=True)
    (run / "export" / "README.md").write_text("# old card\n")
    (run / "export" / "data" / "train-00000-of-00001.parquet").write_bytes(b"old")
    assert main(["export", str(run)]) == 0
    assert (run / "export" / output_paths.MARKER).is_file() and "old card" not in (run / "export" / "README.md").read_text()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    capsys.readouterr()

    other = make_run(tmp_path / "other", demo_records(2, 2))
    user_folder(other / "export")
    refused(capsys, ["export", str(other)], tmp_path, f"export folder {other / 'export'}: a folder katdata did not write")
    (other / "export" / "README.md").write_text("# an old card\n")  # looks like an export, but holds the user's files
    refused(capsys, ["export", str(other)], tmp_path, "holds notes.txt, sub", "export did not write")


def test_failed_export_leaves_no_folder_behind(tmp_path, run, capsys):
    with open(run / "records.jsonl", "a") as f:
        f.write("{broken\n")
    assert main(["export", str(run), "--out", str(tmp_path / "a" / "b" / "ds")]) == 2
    assert "records.jsonl:9: broken JSON" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # a/b made for the output are gone again
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_export_honours_the_umask(tmp_path, run, umask, folder, file):
    """Not 0700 (tempfile.mkdtemp's mode): the modes a plain mkdir / open give under the user's umask."""
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "katdata", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, umask=umask, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["."] == folder and modes["data"] == folder
    assert {m for name, m in modes.items() if (out / name).is_file()} == {file}


# ---------------------------------------------------------------- train / rl / eval output folders


@pytest.mark.parametrize("cmd, what, texts", [
    ("train", "user folder", ["a folder katdata did not write"]),
    ("eval", "file", ["a file"]),
    ("eval", "user folder", ["a folder katdata did not write"]),
    ("rl", "user folder", ["a folder katdata did not write"]),
    ("rl", "link", ["a symbolic link"]),
])
def test_train_rl_eval_refuse_a_folder_they_did_not_write(tmp_path, run, capsys, cmd, what, texts):
    """train, rl and eval write RUN/train, RUN/rl and RUN/eval (run_folder.FILES): never over what a user put there."""
    (run / "export").mkdir()
    (run / "export" / "README.md").write_text("# card\n")
    if cmd != "train":
        (run / "train").mkdir()
        (run / "train" / "split.json").write_text('{"train": [], "heldout": []}')
    target = run / cmd
    if what == "user folder":
        user_folder(target)
    elif what == "file":
        target.write_text("x")
    else:
        target.symlink_to(user_folder(tmp_path / "mine"))
    refused(capsys, [cmd, str(run)], tmp_path, *[str(target), *texts])


def test_the_removed_output_key_is_one_line(tmp_path, run, capsys):
    for cmd in ("train", "rl", "eval"):
        assert main([cmd, str(run), "--set", "output=elsewhere"]) == 2
        line = error_line(capsys)
        assert f"the {cmd} stage always writes RUN_DIR/{cmd}/" in line and "Value error" not in line, line


def test_stage_folders_katdata_wrote_are_its_own(tmp_path, run):
    def fingerprint(folder: Path, kind: str) -> Path:
        folder.mkdir(parents=True)
        (folder / "fingerprint.json").write_text(json.dumps({"settings": {f"{kind}.seed": 0}, "inputs": {}}))
        return folder

    check = output_paths.check_replaceable
    assert check(run / "train", run_dir=run, kind="train") == "new"
    assert check(fingerprint(run / "train", "train"), run_dir=run, kind="train") == "own"
    assert check(fingerprint(tmp_path / "elsewhere", "eval"), run_dir=run, kind="eval") == "own"
    with pytest.raises(RunFolderError, match="fingerprint.json was not written by katdata train"):
        check(tmp_path / "elsewhere", run_dir=run, kind="train")
    (run / "old-style").mkdir()
    (run / "old-style" / "train.json").write_text("{}")  # a train folder from before fingerprints, in the run
    assert check(run / "old-style", run_dir=run, kind="train") == "own"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "train.json").write_text("{}")  # the same name outside the run proves nothing
    with pytest.raises(RunFolderError, match="a folder katdata did not write"):
        check(tmp_path / "outside", run_dir=run, kind="train")
    with pytest.raises(RunFolderError, match="a run folder"):
        check(make_run(tmp_path / "second", demo_records(1, 1)), run_dir=run, kind="eval")


# ---------------------------------------------------------------- review, calibrate, template


@pytest.mark.parametrize("action", ["push", "pull"])
def test_review_refuses_before_asking_the_server_when_its_folder_is_taken(tmp_path, run, capsys, action, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:9")  # never reached: the check comes first
    (run / "review").write_text("my review notes\n")
    before = snapshot(tmp_path)
    assert main(["review", action, str(run)]) == 3
    assert f"{run / 'review'}: a file, not the folder where review writes" in error_line(capsys)
    (run / "review").unlink()
    (run / "review" / "merged.jsonl").mkdir(parents=True)
    assert main(["review", action, str(run)]) == 3
    assert "merged.jsonl: not a file katdata wrote" in error_line(capsys)
    (run / "review" / "merged.jsonl").rmdir()
    (run / "review").rmdir()
    (run / "review").write_text("my review notes\n")
    assert snapshot(tmp_path) == before


def test_calibrate_writes_only_into_a_run_folder(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    (mine / "calibration_reliability.png").write_bytes(b"my plot")  # the name calibrate removes in a run folder
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    assert main(["calibrate", str(mine)]) == 3
    assert "votes.jsonl not found: run the vote stage first" in error_line(capsys)
    assert main(["calibrate", str(tmp_path / "afile")]) == 3
    assert "afile: not a folder" in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_template_writes_to_stdout_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["template", "chat-template"]) == 0
    assert main(["template", "render", "--mode", "off", "--judge", "j", "--answer", "4"]) == 0
    assert "<answer>" in capsys.readouterr().out and list(tmp_path.iterdir()) == []

"""Packaged recipes: `katdata ls` / `cp` / `run NAME` / `validate NAME` from any folder, and from a wheel.

The recipes live in the package (katdata/recipes/), so `pip install katdata` has them: the last test builds
a wheel, installs it into a fresh venv outside the repository and uses them from an empty folder.
"""

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from katdata.cli import main
from katdata.recipe_registry import RECIPES_DIR, packaged

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = RECIPES_DIR / "quickstart.yaml"
NAMES = ["gsm8k_vllm", "humaneval_vllm", "openai_server", "quickstart", "quickstart_round2", "rl_quickstart",
         "train_only"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("katdata: ") and "\n" not in err, err
    return err


def test_ls_lists_the_packaged_recipes_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"  {name} " in out, name
    assert "Every stage but review on 44 real queries" in out  # the first comment line beside the name
    stages = [line.split()[0] for line in out[out.index("stages, in order"):].splitlines()[1:]]
    assert "accelerate/multi_gpu" in out and stages[:3] == ["load", "decontaminate", "tag"] and stages[-1] == "eval"
    assert sorted(packaged()) == NAMES and "accelerate/multi_gpu" in packaged(everything=True)


def test_ls_dir_also_lists_a_folder_of_ones_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.yaml").write_text("# my first recipe\nname: a\n")
    (tmp_path / "mine" / "b.yaml").write_bytes(b"# caf\xe9\n")
    assert main(["ls", "--dir", "mine"]) == 0
    out = capsys.readouterr().out
    assert "  quickstart " in out and "recipes in mine:" in out
    assert f"{Path('mine/a.yaml')}  my first recipe" in out and "b.yaml  (not UTF-8 text)" in out


def test_cp_copies_a_recipe_byte_for_byte_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "quickstart"]) == 0
    assert "katdata run quickstart.yaml" in capsys.readouterr().out
    copy = tmp_path / "quickstart.yaml"
    assert copy.read_bytes() == QUICKSTART.read_bytes()
    copy.write_text("# my edit\n")
    assert main(["cp", "quickstart"]) == 2
    err = one_line_error(capsys)
    assert "quickstart.yaml: already exists" in err and "never overwrites" in err
    assert copy.read_text() == "# my edit\n"
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere")  # a broken link is not written through either
    assert main(["cp", "quickstart", "gone.yaml"]) == 2 and "gone.yaml: already exists" in one_line_error(capsys)
    assert not (tmp_path / "nowhere").exists()


def test_cp_to_a_file_a_folder_and_the_accelerate_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert main(["cp", "quickstart_round2", "sub"]) == 0
    assert main(["cp", "quickstart_round2.yaml", "round2.yaml"]) == 0
    assert main(["cp", "accelerate/multi_gpu"]) == 0
    out = capsys.readouterr().out
    assert "copied accelerate/multi_gpu to multi_gpu.yaml\n" in out  # not a recipe: no `katdata run` hint
    for copy in ("sub/quickstart_round2.yaml", "round2.yaml"):
        assert (tmp_path / copy).read_bytes() == (RECIPES_DIR / "quickstart_round2.yaml").read_bytes()
    assert (tmp_path / "multi_gpu.yaml").read_bytes() == (RECIPES_DIR / "accelerate" / "multi_gpu.yaml").read_bytes()
    before = sorted(tmp_path.rglob("*"))
    assert main(["cp", "quickstart", "no/such/dir/q.yaml"]) == 2
    assert "no/such/dir: no such folder" in one_line_error(capsys)
    assert main(["cp", "quickstart", "newdir/"]) == 2 and "newdir: no such folder" in one_line_error(capsys)
    assert sorted(tmp_path.rglob("*")) == before  # nothing made


@pytest.mark.parametrize("argv", [["run", "quikstart"], ["validate", "quickstart", "quikstart.yaml"],
                                  ["cp", "quikstart"], ["run", "recipes/quickstart.yaml"]])
def test_an_unknown_name_lists_the_packaged_ones_with_the_closest(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"{argv[-1]}: " in err and "did you mean 'quickstart'?" in err
    assert all(name in err for name in NAMES)
    assert list(tmp_path.iterdir()) == []  # no run folder, no copy


def test_validate_and_run_a_packaged_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """run_dir and previous_round are relative to the working directory, not to the installed recipe."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "quickstart", "train_only.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"ok  quickstart  (packaged: {QUICKSTART})" in out and "ok  train_only.yaml" in out
    assert main(["run", "quickstart", "--until", "decontaminate"]) == 0
    capsys.readouterr()
    assert len((tmp_path / "runs/quickstart/queries.jsonl").read_text().splitlines()) == 44
    assert "name: quickstart" in (tmp_path / "runs/quickstart/recipe.yaml").read_text()
    # round two reads round one's folder and adapter, relative to here
    assert main(["validate", "quickstart_round2"]) == 2
    err = one_line_error(capsys)
    assert "lora_path: no such file or folder: runs/quickstart/train/adapter" in err and "has no tags.jsonl" in err
    adapter = tmp_path / "runs/quickstart/train/adapter"
    adapter.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # what the checks look for, not a real adapter
        (adapter / name).write_text("{}")
    (tmp_path / "runs/quickstart/tags.jsonl").write_text("")
    assert main(["validate", "quickstart_round2"]) == 0


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("name: [unclosed\n")
    assert main(["validate", "quickstart"]) == 2
    assert one_line_error(capsys).startswith("katdata: error: quickstart:2: not valid YAML")
    (tmp_path / "quickstart").unlink()
    (tmp_path / "quickstart.yaml").write_text(QUICKSTART.read_text() + "# edited\n")
    with caplog.at_level(logging.WARNING, logger="katdata.recipe_registry"):
        assert main(["validate", "quickstart"]) == 0  # the packaged one; the edited copy is named in a warning
    assert "(packaged:" in capsys.readouterr().out
    assert "katdata run quickstart.yaml" in caplog.text
    assert main(["validate", "quickstart.yaml"]) == 0 and "(packaged:" not in capsys.readouterr().out


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_a_wheel_installed_outside_the_repository_has_the_recipes(tmp_path):
    """pip wheel from a copy of the sources, install --no-deps into a fresh venv (its dependencies from the
    main venv through a .pth file; the repository is not importable), then ls / cp / validate from an empty folder."""
    t0 = time.perf_counter()
    src = tmp_path / "src"  # a clean copy: an in-tree build would leave build/ and stale files in the repository
    shutil.copytree(ROOT / "katdata", src / "katdata", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("katdata-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "_katdata_test_deps.pth").write_text("".join(p + "\n" for p in deps))  # pydantic, pyyaml, ... only
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    where = _run([str(python), "-c", "import katdata; print(katdata.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(site) and not Path(where).is_relative_to(ROOT), where
    katdata = [str(venv / "bin" / "katdata")]
    installed = site / "katdata" / "recipes"
    assert (installed / "accelerate" / "multi_gpu.yaml").is_file()

    out = _run([*katdata, "ls"], cwd=work, env=env).stdout
    assert all(f"  {name} " in out for name in NAMES) and "accelerate/multi_gpu" in out
    assert "copied quickstart to quickstart.yaml" in _run([*katdata, "cp", "quickstart"], cwd=work, env=env).stdout
    copy = work / "quickstart.yaml"
    assert copy.read_bytes() == (installed / "quickstart.yaml").read_bytes() == QUICKSTART.read_bytes()
    copy.write_text(copy.read_text() + "# mine\n")
    edited = copy.read_bytes()
    again = subprocess.run([*katdata, "cp", "quickstart"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "quickstart.yaml: already exists" in again.stderr
    assert copy.read_bytes() == edited
    out = _run([*katdata, "validate", "quickstart"], cwd=work, env=env).stdout
    assert out.startswith("ok  quickstart") and str(installed / "quickstart.yaml") in out
    assert sorted(p.name for p in work.iterdir()) == ["quickstart.yaml"]
    print(f"wheel build + install + checks: {time.perf_counter() - t0:.1f} s")

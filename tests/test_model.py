"""The embedded model: found in the installed package, converted once, atomically."""

import os
import signal
import subprocess
import sys
import time

import pytest

from katdata import model


def test_gguf_is_found_in_the_installed_package():
    path = model.gguf_path()
    assert path.name == model.GGUF_FILE and path.stat().st_size > 50_000_000


def test_resolve_defaults_to_the_embedded_model():
    assert model.resolve(None) == model.resolve("embedded") == str(model.embedded_path())
    assert model.resolve("/some/other/model") == "/some/other/model"


@pytest.mark.slow  # converts the model several times, killed at each point: minutes (make test-slow)
def test_conversion_is_atomic_under_kill_9(tmp_path):
    """kill -9 mid-conversion leaves no half folder; the next call converts and the model answers."""
    import transformers  # noqa: F401
    env = dict(os.environ, KATDATA_CACHE=str(tmp_path))
    code = "from katdata.model import embedded_path; embedded_path()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    target = tmp_path / "models" / model.EMBEDDED_NAME
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "models").glob(".convert-*/*")):
        time.sleep(0.05)  # wait until it has begun writing into its temporary folder
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists(), "a killed conversion must not leave the target folder"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file()

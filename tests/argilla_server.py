"""A real Argilla 2.8 server for the tests, started once per test session by annotation/server.sh.

Use it by binding the fixture into a test module (tests/conftest.py is not ours to edit)::

    argilla_server = <this module>.argilla_server   # test_review.py imports this file by path

The server runs on free 127.0.0.1 ports with its data in a temporary folder, and is stopped (by
the PIDs server.sh saved) when the session ends, even when tests fail. The first run creates
.venv-argilla (about 30-90 s, needs PyPI); later sessions reuse it.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from katdata.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "annotation" / "server.sh"


@dataclass
class ArgillaServer:
    url: str
    api_key: str
    password: str
    dir: Path
    start_s: float
    _tokens: dict = field(default_factory=dict)

    def owner(self):
        import argilla as rg

        return rg.Argilla(api_url=self.url, api_key=self.api_key, retries=1)

    def annotator(self, username: str, workspace: str) -> dict:
        """HTTP headers of an annotator in ``workspace`` (created on first use), as the web UI gets them."""
        import argilla as rg
        import requests

        if username not in self._tokens:
            client = self.owner()
            user = client.users(username) or rg.User(
                username=username, password=f"{username}-pw-1234", role="annotator", client=client
            ).create()
            ws = client.workspaces(workspace)
            if username not in [u.username for u in ws.users]:
                ws.add_user(user)
            r = requests.post(
                f"{self.url}/api/v1/token", data={"username": username, "password": f"{username}-pw-1234"}, timeout=30
            )
            r.raise_for_status()
            self._tokens[username] = r.json()["access_token"]
        return {"Authorization": f"Bearer {self._tokens[username]}"}

    def reviewer(self, username: str, workspace: str):
        """An ``argilla.Argilla`` SDK client logged in as annotator ``username`` (created on first use)."""
        import argilla as rg
        import requests

        me = requests.get(f"{self.url}/api/v1/me", headers=self.annotator(username, workspace), timeout=30)
        me.raise_for_status()
        return rg.Argilla(api_url=self.url, api_key=me.json()["api_key"], retries=1)


def _run(action: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    """Start argilla-server + noida-db for this session; yield an ArgillaServer; stop both."""
    folder = tmp_path_factory.mktemp("argilla")
    port = free_port()
    env = dict(
        os.environ,
        ARGILLA_SERVER_DIR=str(folder),
        ARGILLA_PORT=str(port),
        ARGILLA_ES_PORT=str(free_port()),
        ARGILLA_REDIS_PORT=str(free_port()),
    )
    env.pop("ARGILLA_API_KEY", None)  # the server makes its own key; a user's key must not leak in
    t0 = time.monotonic()
    try:
        started = _run("start", env)
        if started.returncode != 0:
            pytest.fail(f"annotation/server.sh start failed:\n{started.stdout}\n{started.stderr}", pytrace=False)
        server = ArgillaServer(
            url=f"http://127.0.0.1:{port}",
            api_key=(folder / "api_key").read_text(),
            password=(folder / "password").read_text(),
            dir=folder,
            start_s=time.monotonic() - t0,
        )
        yield server
    finally:
        _run("stop", env, timeout=60)

"""Open a pushed dataset in Argilla's own web UI with Debian's headless Chromium; save a screenshot.

    ARGILLA_UI_PASSWORD=... python annotation/screenshot.py --url http://127.0.0.1:6900 \\
        --dataset-id UUID --out docs/argilla-record.png

It signs in through the UI's own ``/sign-in?auth=`` route (user ``argilla`` by default), then loads
the dataset's annotation page in the same fresh browser profile, saves a PNG and returns the page's
rendered DOM so a caller can check what a reviewer sees. Needs ``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1100",
    "--virtual-time-budget=20000",
]


def _chromium(profile: str, *args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    done = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def capture(url: str, dataset_id: str, out: Path, password: str, username: str = "argilla") -> str:
    """Sign in, screenshot the dataset's annotation page to ``out``, and return its rendered DOM."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    page = f"{url.rstrip('/')}/dataset/{dataset_id}/annotation-mode"
    profile = tempfile.mkdtemp(prefix="katdata-chromium-")
    try:
        _chromium(profile, "--dump-dom", f"{url.rstrip('/')}/sign-in?auth={auth}")
        out.parent.mkdir(parents=True, exist_ok=True)
        _chromium(profile, f"--screenshot={out}", page)
        return _chromium(profile, "--dump-dom", page)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the Argilla server URL")
    parser.add_argument("--dataset-id", required=True, help="the dataset's id (review/push.json has it)")
    parser.add_argument("--out", type=Path, default=Path("docs/argilla-record.png"), help="the PNG to write")
    parser.add_argument("--username", default="argilla", help="UI user (its password: $ARGILLA_UI_PASSWORD)")
    args = parser.parse_args(argv)
    password = os.environ.get("ARGILLA_UI_PASSWORD")
    if not password:
        print("set ARGILLA_UI_PASSWORD (annotation/server.sh keeps it in .argilla/password)", file=sys.stderr)
        return 2
    capture(args.url, args.dataset_id, args.out, password, args.username)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

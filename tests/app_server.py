"""Start `python app.py` in a subprocess on a tiny random model, for the API and browser tests.

A subprocess because the app reads its configuration from the environment at import, exactly as
a Space or a local `python app.py` does.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_app_env(workdir: Path, model: tuple[Path, Path], **overrides: str) -> dict[str, str]:
    """Environment for an app on the tiny `model` (base, ref; conftest's `tiny_model()`), small
    defaults, private caches in `workdir`."""
    base, ref = model
    env = {
        "REFANY3D_BASE_MODEL": str(base),
        "REFANY3D_REF_MODEL": str(ref),
        "REFANY3D_DEVICE": "cpu",
        "REFANY3D_DEFAULT_RESOLUTION": "64",
        "REFANY3D_DEFAULT_STEPS": "1",
        "REFANY3D_DEFAULT_VIEWS": "2",
        "REFANY3D_MAX_UPLOAD_MB": "1",
        "GRADIO_EXAMPLES_CACHE": str(workdir / "examples_cache"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(overrides)
    return env


@contextmanager
def running_app(env: dict[str, str], log_path: Path, timeout_s: float = 180.0):
    """Yield the URL of a running app; stop it afterwards (its log is at `log_path`)."""
    port = _free_port()
    full_env = {**os.environ, **env, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    url = f"http://127.0.0.1:{port}/"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full_env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not serve within {timeout_s} s:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

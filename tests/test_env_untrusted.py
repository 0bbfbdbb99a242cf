"""An Env's packages are untrusted code too: building one runs none of it on the server.

A wheel may carry a `.pth` file, which Python runs at every interpreter start: a package from the
index can put code there. The wheel here (built by hand, served from a find-links directory the
server's pip configuration names, as a machine's own wheel directory would be) writes a marker
file from its `.pth` and sets a variable. Its code must run in the function's workers, inside the
sandbox, and nowhere else: not while the server builds the Env (uv installs wheels without running
them, and the import check runs without `site`), and not in the server's own processes.
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import NO_SANDBOX, Server

NAME, VERSION = "emberpthprobe", "1.0"


def make_wheel(folder: Path, marker: Path) -> Path:
    """A pure-Python wheel whose .pth writes `marker` and sets EMBER_PTH_RAN when it runs."""
    dist = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{NAME}/__init__.py": "VERSION = '1.0'\n",
        f"{NAME}_hook.pth": (
            "import os; os.environ['EMBER_PTH_RAN'] = '1'; "
            f"exec(\"try:\\n open({str(marker)!r}, 'w').write('ran')\\nexcept OSError:\\n pass\")\n"
        ),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


SOURCE = f"""
import ember

app = ember.App("pthprobe")


@app.function(env=ember.Env.standard().pip_install("{NAME}=={VERSION}"))
def probe() -> dict:
    import os

    import {NAME}

    return {{"version": {NAME}.VERSION, "pth_ran": os.environ.get("EMBER_PTH_RAN")}}
"""


@pytest.mark.skipif(NO_SANDBOX, reason="the worker's side of this needs the bubblewrap sandbox")
def test_a_wheels_pth_runs_in_the_sandboxed_worker_only(
    make_server: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    marker = tmp_path / "pth-ran-here"
    make_wheel(wheels, marker)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))  # the server's pip settings name it
    server = make_server()
    server.deploy(textwrap.dedent(SOURCE))
    # built and imported at deploy: nothing of the package ran on the server
    assert not marker.exists()
    out = server.function("pthprobe", "probe").remote()
    # in the worker it did run, and could not reach the server's files
    assert out == {"version": "1.0", "pth_ran": "1"}
    assert not marker.exists()

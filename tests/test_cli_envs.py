"""`ember deploy` with a bundle and an Env, and `ember env list/show/export/prune`, as a user
runs them: a subprocess against a real server, a real uv build from the registry."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server
from test_cli import ember, plain

SOURCE = """
import ember

from proj import helper

app = ember.App("clienv")
ENV = ember.Env.standard().pip_install("six==1.16.0")


@app.function(env=ENV)
def six_version() -> str:
    import six

    return f"{helper.PREFIX}{six.__version__}"
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("clienv")
    server = Server(root / "data").start()
    pkg = root / "code" / "proj"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text('PREFIX = "six "\n')
    (pkg / "main.py").write_text(textwrap.dedent(SOURCE))
    yield server, pkg / "main.py"
    server.shutdown(timeout=15)


def test_deploy_shows_the_bundle_the_env_build_and_waits_for_the_import(
    deployed: tuple[Server, Path],
) -> None:
    server, main = deployed
    proc = ember(server, "deploy", str(main), timeout=180)
    assert proc.returncode == 0, proc.stderr
    err = plain(proc.stderr)
    assert "bundle proj/main.py: 3 files" in err and "(uploaded)" in err
    assert "standard + six==1.16.0" in err and "built in" in err
    out = plain(proc.stdout)
    assert "deployed app clienv version 1: six_version (code imported in" in out
    env_id = server.http("GET", "/v1/apps/clienv").json()["envs"]["six_version"]
    assert f"six_version runs in {env_id}" in out
    call = ember(server, "call", "clienv/six_version")
    assert call.returncode == 0, call.stderr
    assert '"six 1.16.0"' in call.stdout
    # unchanged code and Env: nothing uploaded or built again, and `--no-wait` returns at once
    again = ember(server, "deploy", "--no-wait", str(main))
    assert again.returncode == 0, again.stderr
    assert "unchanged, already on the server" in plain(again.stderr)
    assert "ready" in plain(again.stderr) and "built in" not in plain(again.stderr)
    assert "(not waiting)" in plain(again.stdout)


def test_env_list_show_export_and_prune(deployed: tuple[Server, Path]) -> None:
    server, main = deployed
    if server.http("GET", "/v1/apps/clienv").status_code == 404:
        assert ember(server, "deploy", str(main), timeout=180).returncode == 0
    env_id = server.http("GET", "/v1/apps/clienv").json()["envs"]["six_version"]
    listing = ember(server, "env", "list")
    assert listing.returncode == 0, listing.stderr
    assert env_id in listing.stdout and "six==1.16.0" in listing.stdout
    shown = plain(ember(server, "env", "show", env_id).stdout)
    assert "base standard" in shown and "asked for: six==1.16.0" in shown
    assert "six==1.16.0" in shown.split("lock (", 1)[1]
    assert "used by: clienv v" in shown and "six_version" in shown
    exported = ember(server, "env", "export", env_id)
    assert exported.returncode == 0, exported.stderr
    assert "six==1.16.0" in exported.stdout and "--hash=sha256:" in exported.stdout
    # in use: nothing to prune
    kept = ember(server, "env", "prune")
    assert "nothing to prune" in kept.stdout
    # redeployed without the Env, it goes (the dry run first says so and removes nothing)
    main.write_text(textwrap.dedent(SOURCE).replace("@app.function(env=ENV)", "@app.function()"))
    assert ember(server, "deploy", str(main), timeout=60).returncode == 0
    dry = ember(server, "env", "prune", "--dry-run")
    assert f"would remove 1 Env(s): {env_id}" in dry.stdout
    assert env_id in ember(server, "env", "list").stdout
    gone = ember(server, "env", "prune")
    assert f"removed 1 Env(s): {env_id}" in gone.stdout
    assert not (server.data_dir / "envs" / env_id).exists()
    missing = ember(server, "env", "show", env_id)
    assert missing.returncode == 1 and "no Env" in missing.stderr


def test_a_failed_build_prints_the_resolver_and_deploys_nothing(
    deployed: tuple[Server, Path], tmp_path: Path
) -> None:
    server, _ = deployed
    bad = tmp_path / "badenv.py"
    bad.write_text(
        textwrap.dedent(SOURCE)
        .replace('app = ember.App("clienv")', 'app = ember.App("badenv")')
        .replace("from proj import helper\n", "")
        .replace("six==1.16.0", "six==99.0.1")
    )
    proc = ember(server, "deploy", str(bad), timeout=120)
    assert proc.returncode == 1
    err = plain(proc.stderr)
    assert "failed" in err and "six==99.0.1" in err
    assert server.http("GET", "/v1/apps/badenv").status_code == 404

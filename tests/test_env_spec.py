"""Env specs as plain data, and where packages come from: pure checks, no server, no uv.

An Env is hashed from its content, so the same Env is found again; a spec a client sends is
untrusted input and refused with a message saying what to change; the machine's pip settings
are what a build uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import ember
from ember.envs.pipconf import PackageSources, package_sources
from ember.envs.spec import EnvSpec, EnvSpecError, parse_lock_text, parse_requirements_text
from ember.errors import InvalidSpec


def test_an_env_is_plain_data_hashed_from_its_content() -> None:
    a = ember.Env.standard().pip_install("six==1.16.0").env({"K": "v"})
    b = ember.Env.standard().env({"K": "v"}).pip_install("six==1.16.0")
    assert a.spec == b.spec and a.spec.digest() == b.spec.digest()
    assert a.spec.digest() != ember.Env.standard().pip_install("six==1.17.0").spec.digest()
    # what the server adds (its Python, the AI base) is part of the id
    assert a.spec.digest({"python": "3.11"}) != a.spec.digest({"python": "3.12"})
    # each method returns a new Env: a base can be shared and extended
    base = ember.Env.ai()
    assert base.pip_install("x").spec.packages == ("x",) and base.spec.packages == ()


def test_null_is_the_same_as_left_out() -> None:
    assert EnvSpec.from_dict({"packages": None, "variables": None}) == EnvSpec.from_dict({})


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"base": "gpu"}, ["base must be one of standard, ai"]),
        ({"python": "three"}, ["python must be a version"]),
        ({"packages": "six"}, ["packages must be a list"]),
        ({"packages": ["six", 3]}, ["not a one-line string"]),
        ({"variables": {"EMBER_X": "1"}}, ["set by the platform"]),
        ({"variables": {"LD_PRELOAD": "/x.so"}}, ["set by the platform"]),
        ({"variables": {"K": 3}}, ["must be a string"]),
        ({"variables": False}, ["variables must be an object"]),
        ({"packages": False}, ["packages must be a list"]),
        ({"lock": ["six==1.16.0"], "packages": ["x"]}, ["installs the lock alone"]),
        ({"colour": "red"}, ["unknown environment field 'colour'"]),
    ],
)
def test_a_spec_that_cannot_be_built_says_what_to_change(
    raw: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(EnvSpecError) as err:
        EnvSpec.from_dict(raw)
    for word in words:
        assert word in str(err.value)


def test_a_lock_line_may_be_as_long_as_a_release_with_many_wheels() -> None:
    hashes = " ".join(f"--hash=sha256:{i:064x}" for i in range(300))  # ~24 KiB, like numpy's
    spec = EnvSpec.from_dict({"lock": [f"numpy==2.1.0 {hashes}"]})
    assert spec.lock is not None and len(spec.lock[0]) > 20_000


def test_requirements_and_locks_name_the_file_and_line_that_is_wrong(tmp_path: Path) -> None:
    assert parse_requirements_text("# pins\nsix==1.16.0  # comment\n\nidna<4\n", "r.txt") == [
        "six==1.16.0",
        "idna<4",
    ]
    with pytest.raises(EnvSpecError, match=r"r\.txt:2: 'six===' is not a valid requirement"):
        parse_requirements_text("idna\nsix===\n", "r.txt")
    with pytest.raises(EnvSpecError, match=r"r\.txt:1: '-r other.txt': options and includes"):
        parse_requirements_text("-r other.txt\n", "r.txt")
    with pytest.raises(EnvSpecError, match="URL"):
        parse_requirements_text("six @ https://example.com/six.whl\n", "r.txt")
    lock = "six==1.16.0 \\\n    --hash=sha256:" + "a" * 64 + "\n"
    assert parse_lock_text(lock, "env.lock") == ["six==1.16.0 --hash=sha256:" + "a" * 64]
    with pytest.raises(EnvSpecError, match=r"env\.lock:1: 'six>=1' is not pinned"):
        parse_lock_text("six>=1\n", "env.lock")
    # through the SDK, at deploy time, as InvalidSpec
    bad = tmp_path / "requirements.txt"
    bad.write_text("six===\n")
    with pytest.raises(InvalidSpec, match=r"requirements\.txt:1"):
        ember.Env.standard().pip_install_from_requirements(bad).resolve()
    with pytest.raises(InvalidSpec, match="no such file"):
        ember.Env.standard().pip_install_from_requirements(tmp_path / "missing.txt").resolve()


def test_the_machines_pip_settings_are_what_uv_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        f"extra-index-url = file://{tmp_path}/missing https://extra.example/simple\n"
        f"find-links = {wheels}\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    sources = package_sources()
    # a local index that is not there is skipped, as pip skips it
    assert sources == PackageSources(
        index_url="https://mirror.example/simple",
        extra_index_urls=("https://extra.example/simple",),
        find_links=(str(wheels),),
        constraints=sources.constraints,
    )
    args = sources.uv_args()
    assert args[:2] == ["--index-url", "https://mirror.example/simple"]
    assert "--find-links" in args and "unsafe-best-match" in args
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    offline = package_sources().uv_args()
    assert offline[0] == "--no-index" and "--index-url" not in offline
    assert "--extra-index-url" not in offline and "--find-links" in offline

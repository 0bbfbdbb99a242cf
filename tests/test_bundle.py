"""Code bundles: what a deploy collects, how the zip is made, and what the server accepts."""

from __future__ import annotations

import io
import os
import stat
import struct
import time
import zipfile
from pathlib import Path

import pytest

from ember.envs import bundle
from ember.envs.bundle import (
    Bundle,
    BundleError,
    BundleTooLarge,
    collect,
    digest_of,
    extract,
    open_bundle,
    root_of,
)


def write(path: Path, content: str | bytes = "x = 1\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def paths(b: Bundle) -> list[str]:
    return [f.path for f in b.files]


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in entries:
            zf.writestr(name, content)
    return buf.getvalue()


# --- where a bundle starts ------------------------------------------------------------------


def test_a_plain_directory_is_its_own_root(tmp_path: Path) -> None:
    app = write(tmp_path / "proj" / "app.py")
    assert root_of(app) == (tmp_path / "proj", "app")


def test_nested_packages_root_at_the_parent_of_the_outermost(tmp_path: Path) -> None:
    write(tmp_path / "proj" / "pkg" / "__init__.py", "")
    write(tmp_path / "proj" / "pkg" / "sub" / "__init__.py", "")
    app = write(tmp_path / "proj" / "pkg" / "sub" / "app.py")
    assert root_of(app) == (tmp_path / "proj", "pkg.sub.app")
    b = collect(app)
    assert (b.root, b.module, b.filename) == (tmp_path / "proj", "pkg.sub.app", "pkg/sub/app.py")
    assert paths(b) == ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/app.py"]


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "app.py")
    monkeypatch.chdir(tmp_path)
    assert root_of(Path("app.py")) == (tmp_path, "app")


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a file"):
        root_of(tmp_path / "nope.py")


# --- what a bundle leaves out ---------------------------------------------------------------


def test_defaults_leave_out_tooling_data_and_secrets(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "helper.py")
    write(tmp_path / "lib" / "util.py")
    for junk in [
        ".git/HEAD",
        ".venv/lib/site.py",
        "__pycache__/app.cpython-311.pyc",
        "lib/__pycache__/util.cpython-311.pyc",
        "lib/stale.pyc",
        ".ember/token",
        "state/ember.db",
        "state/bundles/other.py",
        ".env",
        "lib/.env",
        ".env.local",
        "node_modules/x/index.js",
        "dist/app-0.1.tar.gz",
        "app.egg-info/PKG-INFO",
    ]:
        write(tmp_path / junk, "secret")
    b = collect(app)
    assert paths(b) == ["app.py", "helper.py", "lib/util.py"]


def test_a_root_that_is_a_data_dir_is_refused(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "ember.db", b"")
    with pytest.raises(BundleError, match="data directory"):
        collect(app)


def test_emberignore_excludes_and_re_includes(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "data" / "big.bin", b"\0" * 10)
    write(tmp_path / "notes.md")
    write(tmp_path / "build" / "generated.py")
    write(tmp_path / ".env", "TOKEN=not-secret-for-this-app")
    write(tmp_path / ".emberignore", "# comments work\ndata/\n*.md\n!build/\n!.env\napp.py\n")
    b = collect(app)
    # app.py is matched by the ignore file, yet the deployed file always travels
    assert paths(b) == [".emberignore", ".env", "app.py", "build/generated.py"]


def test_symlinks_files_followed_dirs_not_dangling_skipped(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "shared.py", "SHARED = 1\n")
    write(tmp_path / "outside" / "deep" / "x.py")
    proj = tmp_path / "proj"
    app = write(proj / "app.py")
    (proj / "shared.py").symlink_to(outside)
    (proj / "loop").symlink_to(proj, target_is_directory=True)
    (proj / "outdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (proj / "dangling.py").symlink_to(proj / "gone.py")
    b = collect(app)
    assert paths(b) == ["app.py", "shared.py"]
    assert dict(open_bundle(b.data))["shared.py"] == b"SHARED = 1\n"


def test_an_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "locked.py")
    read_bytes = Path.read_bytes

    def refuse(self: Path) -> bytes:  # chmod 0 would not stop a test run as root
        if self.name == "locked.py":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(BundleError, match=r"cannot read .*locked\.py: Permission denied"):
        collect(app)


def test_too_many_files_names_the_crowded_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "MAX_FILES", 5)
    app = write(tmp_path / "app.py")
    write(tmp_path / "lib" / "a.py")
    for i in range(6):
        write(tmp_path / "images" / f"{i}.png", b"png")
    with pytest.raises(BundleError, match=r"more than 5 files; images/ holds \d+") as err:
        collect(app)
    assert ".emberignore" in str(err.value)


# --- includes -------------------------------------------------------------------------------


def test_include_a_directory_and_a_file(tmp_path: Path) -> None:
    app = write(tmp_path / "proj" / "app.py")
    assets = tmp_path / "assets"
    write(assets / "logo.svg", "<svg/>")
    write(assets / "fonts" / "a.ttf", b"\x00ttf")
    write(assets / "__pycache__" / "x.pyc", b"junk")  # the defaults apply to includes too
    write(assets / "draft.svg", "<svg/>")
    write(assets / ".emberignore", "draft.svg\n")  # and so does their own ignore file
    lib = write(tmp_path / "elsewhere" / "lib.py", "LIB = 2\n")
    b = collect(app, [(assets, "static"), (lib, "vendor/lib.py")])
    assert paths(b) == [
        "app.py",
        "static/.emberignore",
        "static/fonts/a.ttf",
        "static/logo.svg",
        "vendor/lib.py",
    ]
    assert dict(open_bundle(b.data))["vendor/lib.py"] == b"LIB = 2\n"


def test_include_errors(tmp_path: Path) -> None:
    app = write(tmp_path / "proj" / "app.py")
    write(tmp_path / "proj" / "pkg" / "mod.py")
    extra = write(tmp_path / "extra.py")
    write(tmp_path / "state" / "ember.db", b"")
    cases = [
        ((tmp_path / "state", "state"), "data directory"),
        ((tmp_path / "missing", "x"), "does not exist"),
        ((extra, "../extra.py"), r"'\.\.'"),
        ((extra, "a/../../extra.py"), r"'\.\.'"),
        ((extra, "/etc/extra.py"), "absolute"),
        ((extra, "app.py"), "already is"),  # over a file of the tree
        ((extra, "pkg"), "both a file and a directory"),  # over a directory of the tree
        ((extra, "a\\b.py"), "backslash"),
    ]
    for entry, message in cases:
        with pytest.raises(BundleError, match=message):
            collect(app, [entry])
    # the same file named twice at the same place is no collision
    assert "app.py" in paths(collect(app, [(app, "app.py")]))


# --- the zip itself -------------------------------------------------------------------------


def test_the_same_code_gives_the_same_bytes(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "pkg" / "b.py", "B = 2\n")
    first = collect(app)
    later = time.time() + 3600
    for p in [app, tmp_path / "pkg" / "b.py"]:
        os.utime(p, (later, later))
    (tmp_path / "pkg" / "b.py").chmod(0o755)
    again = collect(app)
    assert again.data == first.data
    assert again.digest == first.digest == digest_of(first.data)
    write(tmp_path / "pkg" / "b.py", "B = 3\n")
    assert collect(app).digest != first.digest


def test_zip_entries_are_sorted_plain_files_with_fixed_metadata(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "z.py")
    write(tmp_path / "a" / "m.py")
    b = collect(app)
    with zipfile.ZipFile(io.BytesIO(b.data)) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["a/m.py", "app.py", "z.py"]
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.external_attr >> 16 == stat.S_IFREG | 0o644


def test_describe(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py", "a" * 2048)
    b = collect(app)
    assert (b.count, b.size) == (1, 2048)
    assert b.describe() == f"1 file, 2.0 KiB, sha256 {b.digest[:12]}"
    assert "data=" not in repr(b)  # a repr must not dump the whole zip


def test_too_large_names_the_biggest_files_and_the_limit(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    write(tmp_path / "data" / "weights.bin", b"\0" * (3 << 20))
    write(tmp_path / "data" / "small.bin", b"\0" * 1000)
    with pytest.raises(BundleTooLarge) as err:
        collect(app, limit=1 << 20)
    message = str(err.value)
    assert "data/weights.bin 3.0 MiB" in message
    assert "1.0 MiB limit" in message
    assert str(tmp_path / ".emberignore") in message and "EMBER_BUNDLE_LIMIT" in message
    assert "EMBER_BUNDLE_LIMIT" in message
    assert err.value.biggest[0].path == "data/weights.bin"
    assert isinstance(err.value, BundleError)


def test_five_biggest_only(tmp_path: Path) -> None:
    app = write(tmp_path / "app.py")
    for i in range(8):
        write(tmp_path / f"f{i}.bin", b"\0" * (100 * (i + 1)))
    with pytest.raises(BundleTooLarge) as err:
        collect(app, limit=100)
    assert [f.path for f in err.value.biggest] == ["f7.bin", "f6.bin", "f5.bin", "f4.bin", "f3.bin"]


# --- the server's side ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../evil.py", b"x")], r"'\.\.'"),
        ([("pkg/../../evil.py", b"x")], r"'\.\.'"),
        ([("/abs.py", b"x")], "absolute"),
        ([("a\\b.py", b"x")], "backslash"),
        ([("./a.py", b"x")], "not a plain path"),
        ([("a", b"x"), ("a/b", b"y")], "both a file and a directory"),
    ],
)
def test_open_bundle_rejects_bad_paths(entries: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        open_bundle(make_zip(list(entries)))


def test_open_bundle_rejects_a_nul_in_a_name() -> None:
    # zipfile cuts a name at a NUL when it writes one, so the NUL is put into the bytes after
    data = make_zip([("a.py#.txt", b"x")]).replace(b"a.py#.txt", b"a.py\x00.txt")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["a.py"]  # what a careless reader would see
    with pytest.raises(BundleError, match="NUL"):
        open_bundle(data)


def test_open_bundle_rejects_garbage() -> None:
    for data in [b"", b"not a zip at all", b"PK\x03\x04" + b"\xff" * 100]:
        with pytest.raises(BundleError, match="not a zip"):
            open_bundle(data)


def test_open_bundle_rejects_duplicates() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("a.py", b"1")
        zf.writestr("a.py", b"2")
    with pytest.raises(BundleError, match="twice"):
        open_bundle(buf.getvalue())


def test_open_bundle_rejects_symlink_entries() -> None:
    link = zipfile.ZipInfo("link.py")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(BundleError, match="symlink"):
        open_bundle(make_zip([(link, b"/etc/passwd")]))


def zip_bomb(size: int) -> bytes:
    """`size` bytes of zeros in one entry, written in chunks (never whole in memory)."""
    buf = io.BytesIO()
    chunk = bytes(1 << 20)
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("bomb.bin", "w") as f,
    ):
        for _ in range(size >> 20):
            f.write(chunk)
    return buf.getvalue()


def test_open_bundle_rejects_a_zip_bomb() -> None:
    data = zip_bomb(200 << 20)
    assert len(data) < 2 << 20  # the upload itself is small
    started = time.monotonic()
    with pytest.raises(
        BundleError, match=r"declares 200\.0 MiB uncompressed, over the 1\.0 MiB limit"
    ):
        open_bundle(data, limit=1 << 20)
    # a header that lies about the size is caught while reading, within the limit
    lying = bytearray(data)
    central = lying.rindex(b"PK\x01\x02")
    struct.pack_into("<I", lying, central + 24, 10)  # the declared uncompressed size
    with pytest.raises(BundleError, match=r"bomb\.bin.*CRC"):
        open_bundle(bytes(lying), limit=1 << 20)
    assert time.monotonic() - started < 3


def test_the_limit_counts_all_entries_together() -> None:
    data = make_zip([("a.bin", b"\0" * 600), ("b.bin", b"\0" * 600)])
    with pytest.raises(BundleError, match="declares"):
        open_bundle(data, limit=1000)
    assert len(open_bundle(data, limit=1200)) == 2


def test_open_bundle_rejects_too_many_files() -> None:
    data = make_zip([(f"f{i}.py", b"") for i in range(4)])
    with pytest.raises(BundleError, match="4 entries, over 3"):
        open_bundle(data, max_files=3)
    assert len(open_bundle(data, max_files=4)) == 4


def test_open_bundle_skips_directory_entries_and_sorts() -> None:
    data = make_zip([("z.py", b"z"), ("pkg/", b""), ("pkg/a.py", b"a")])
    assert open_bundle(data) == [("pkg/a.py", b"a"), ("z.py", b"z")]


# --- round trip and extraction --------------------------------------------------------------


def test_round_trip_reproduces_the_files(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    write(proj / "pkg" / "__init__.py", "")
    app = write(proj / "pkg" / "app.py", "from . import helper\n")
    write(proj / "pkg" / "helper.py", "HELP = 'ü'\n")
    write(proj / "pkg" / "data" / "blob.bin", os.urandom(100_000))
    write(proj / "pkg" / "empty.txt", b"")
    b = collect(app)
    dest = tmp_path / "server" / "bundles" / "v1"
    extract(open_bundle(b.data), dest)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == paths(b)
    for f in b.files:
        assert (dest / f.path).read_bytes() == (proj / f.path).read_bytes()
        assert stat.S_IMODE((dest / f.path).stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "pkg" / "data").stat().st_mode) == 0o755
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert sorted(p.name for p in dest.parent.iterdir()) == ["v1"]  # no temporary left over


def test_extract_into_an_existing_empty_dir(tmp_path: Path) -> None:
    dest = tmp_path / "v1"
    dest.mkdir()
    extract([("a.py", b"A")], dest)
    assert (dest / "a.py").read_bytes() == b"A"


def test_extract_refuses_a_non_empty_or_odd_dest(tmp_path: Path) -> None:
    dest = write(tmp_path / "v1" / "old.py").parent
    with pytest.raises(BundleError, match="not empty"):
        extract([("a.py", b"A")], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["old.py"]
    with pytest.raises(BundleError, match="not a directory"):
        extract([("a.py", b"A")], dest / "old.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_extract_checks_paths_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "v1"
    with pytest.raises(BundleError, match=r"'\.\.'"):
        extract([("ok.py", b""), ("../escape.py", b"")], dest)
    with pytest.raises(BundleError, match="twice"):
        extract([("a.py", b""), ("a.py", b"")], dest)
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape.py").exists()

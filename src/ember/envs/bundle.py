"""Code bundles: a deploy ships the app's local code, the package or directory its file lives in.

The client collects the files (ignore rules in gitignore syntax, so a virtualenv, a `.git` or a
data dir never travels) into a deterministic zip: the same code gives the same bytes and the same
digest, so a redeploy of unchanged code is recognised by its digest alone. The server treats an
uploaded zip as untrusted input: every path is checked, sizes are bounded while reading (a zip
bomb cannot fill memory), and the files land on disk all at once or not at all.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pathspec

DEFAULT_LIMIT = 64 << 20
"""Bytes of file content, uncompressed: the most a bundle may hold unless raised."""
MAX_FILES = 10_000
DEFAULT_IGNORE: tuple[str, ...] = (
    *(".git/", ".hg/", ".svn/", ".venv/", "venv/", "__pycache__/", "*.pyc", "*.pyo"),
    *(".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".tox/", ".nox/", "node_modules/"),
    *(".ipynb_checkpoints/", "*.egg-info/", ".DS_Store", "dist/", "build/"),
    ".ember/",  # ember's own data dir: the database, the token, other apps' bundles
    ".env",  # secrets belong in `ember secret`, not in code that every worker can read
    ".env.*",
)
"""Gitignore-style patterns no bundle wants. A `.emberignore` adds to them; `!pattern` undoes one.
Any directory holding an `ember.db` (a data dir under another name) is skipped as well."""
IGNORE_FILE = ".emberignore"
DATA_MARKER = "ember.db"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError)


class BundleError(ValueError):
    """A bundle that cannot be made or accepted; the message says what to fix."""


class BundleTooLarge(BundleError):
    """Over the size limit; names the biggest files, so the fix is one `.emberignore` line away."""

    def __init__(self, total: int, limit: int, biggest: Sequence[BundleFile], root: Path) -> None:
        self.total, self.limit, self.biggest = total, limit, tuple(biggest)
        files = ", ".join(f"{f.path} {human(f.size)}" for f in self.biggest)
        super().__init__(
            f"the bundle holds {human(total)} of files, over the {human(limit)} limit; the "
            f"biggest: {files}. Exclude what the app does not need in {root / IGNORE_FILE} "
            f"(gitignore syntax), or raise the limit with EMBER_BUNDLE_LIMIT (the client's and the server's)"
        )


@dataclass(frozen=True)
class BundleFile:
    """One file as the deploy lists it: its posix path inside the bundle and its size."""

    path: str
    size: int


@dataclass(frozen=True)
class Bundle:
    """What a deploy uploads: the zip, its digest (the code's identity), and what to import."""

    root: Path
    module: str
    filename: str
    files: tuple[BundleFile, ...] = field(repr=False)
    data: bytes = field(repr=False)
    digest: str

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def count(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        """One line for the deploy's output: what is being uploaded, and which version it is."""
        noun = "file" if self.count == 1 else "files"
        return f"{self.count} {noun}, {human(self.size)}, sha256 {self.digest[:12]}"


def human(n: int) -> str:
    """A byte count as people read it: `512 B`, `48.3 KiB`, `80.0 MiB`."""
    size, unit = float(n), 0
    while size >= 1024 and unit < 3:
        size, unit = size / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{size:.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def digest_of(data: bytes) -> str:
    """The bundle's identity: the server stores and finds a version's code by it."""
    return hashlib.sha256(data).hexdigest()


def root_of(file: Path) -> tuple[Path, str]:
    """The bundle root and the module name: the file's directory, or, when that directory is a
    package (has __init__.py), the parent of its outermost package, so the worker imports
    `pkg.app` the way the developer does and its relative imports keep working."""
    path = Path(os.path.abspath(file))
    if not path.is_file():
        raise BundleError(f"{file} is not a file: deploy a Python file")
    parts = [path.stem] if path.stem != "__init__" else []
    root = path.parent
    while (root / "__init__.py").is_file() and root.parent != root:
        parts.insert(0, root.name)
        root = root.parent
    return root, ".".join(parts)


def check_path(path: str) -> None:
    """Raise unless `path` is a plain relative posix path that stays where it is put."""
    if not path:
        raise BundleError("an empty path")
    if "\x00" in path or "\\" in path:
        raise BundleError(f"{path!r}: a path may hold no NUL and no backslash")
    if path.startswith("/"):
        raise BundleError(f"{path!r} is absolute: paths in a bundle are relative")
    parts = path.split("/")
    if ".." in parts:
        raise BundleError(f"{path!r} leaves the bundle: no '..' in a path")
    if "" in parts or "." in parts:
        raise BundleError(f"{path!r} is not a plain path: no '.', no '//', no trailing '/'")


def _check_tree(paths: Iterable[str]) -> None:
    """Each path valid, none twice, and none both a file and a directory (`a` and `a/b`)."""
    seen: set[str] = set()
    for path in paths:
        check_path(path)
        if path in seen:
            raise BundleError(f"{path!r} appears twice")
        seen.add(path)
    for path in seen:
        for parent in PurePosixPath(path).parents:
            if str(parent) in seen:
                raise BundleError(f"{str(parent)!r} is both a file and a directory")


def _spec(*dirs: Path) -> pathspec.GitIgnoreSpec:
    lines = list(DEFAULT_IGNORE)
    for d in dirs:
        ignore = d / IGNORE_FILE
        if ignore.is_file():
            try:
                lines += ignore.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise BundleError(f"cannot read {ignore}: {e}") from e
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _walk(top: Path, spec: pathspec.GitIgnoreSpec) -> Iterator[tuple[str, Path]]:
    """(relative posix path, local path) of each file under `top` that the rules keep. An ignored
    directory is not entered (as in git, nothing under it can be re-included); symlinked
    directories are not followed; a symlinked file counts as the file it points to."""
    if (top / DATA_MARKER).exists():
        raise BundleError(
            f"{top} holds {DATA_MARKER}: it is an ember data directory, not code; move the app "
            f"out of it or give the server another --data-dir"
        )
    stack = [""]
    while stack:
        rel = stack.pop()
        here = top / rel if rel else top
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name, reverse=True)
        except OSError as e:
            raise BundleError(f"cannot read the directory {here}: {e.strerror}") from e
        subdirs = []
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                marked = os.path.lexists(os.path.join(entry.path, DATA_MARKER))
                if not marked and not spec.match_file(path + "/"):
                    subdirs.append(path)
            elif entry.is_file() and not spec.match_file(path):  # a dangling link is no file
                yield path, Path(entry.path)
        stack.extend(subdirs)


def _remote(remote: str) -> str:
    try:
        check_path(remote.rstrip("/") if remote.strip("/") else remote)
    except BundleError as e:
        raise BundleError(f"include path {e}; use a relative path like 'assets'") from None
    return remote.rstrip("/")


def collect(
    file: Path, include: Sequence[tuple[Path, str]] = (), *, limit: int = DEFAULT_LIMIT
) -> Bundle:
    """Everything under root_of(file) that the ignore rules keep, plus each `include` entry (a
    local file or directory, and the path it gets inside the bundle), zipped deterministically.
    An included directory obeys the defaults, the root's `.emberignore` and its own. The deployed
    file itself is always included, whatever the rules say."""
    root, module = root_of(file)
    deployed = Path(os.path.abspath(file))
    filename = deployed.relative_to(root).as_posix()
    found: dict[str, Path] = {}

    def add(path: str, local: Path, origin: str) -> None:
        try:
            check_path(path)
            path.encode("utf-8")
        except (BundleError, UnicodeError) as e:
            raise BundleError(f"cannot bundle {local}: {e}; rename or exclude it") from None
        if path in found and found[path].resolve() != local.resolve():
            raise BundleError(f"{origin} puts {local} at {path!r}, where {found[path]} already is")
        found[path] = local
        if len(found) > MAX_FILES:
            _too_many(found)

    for path, local in _walk(root, _spec(root)):
        add(path, local, "the app's directory")
    add(filename, deployed, "the deployed file")
    for local_arg, remote_arg in include:
        local, remote = Path(local_arg), _remote(remote_arg)
        if not local.exists():
            raise BundleError(f"cannot include {local}: it does not exist")
        if local.is_dir():
            for path, sub in _walk(local, _spec(root, local)):
                add(f"{remote}/{path}", sub, f"include {local_arg}")
        else:
            add(remote, local, f"include {local_arg}")
    try:
        _check_tree(found)
    except BundleError as e:
        raise BundleError(f"the included paths collide: {e}") from None

    sizes = {path: _size(local) for path, local in found.items()}  # before reading anything big
    if sum(sizes.values()) > limit:
        _too_large(sizes, limit, root)
    contents: dict[str, bytes] = {}
    for path in sorted(found):
        try:
            contents[path] = found[path].read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read {found[path]}: {e.strerror}; exclude it") from e
    sizes = {path: len(data) for path, data in contents.items()}  # a file may change under us
    if sum(sizes.values()) > limit:
        _too_large(sizes, limit, root)
    data = _zip(contents)
    files = tuple(BundleFile(path, size) for path, size in sorted(sizes.items()))
    return Bundle(root, module, filename, files, data, digest_of(data))


def _size(local: Path) -> int:
    try:
        return local.stat().st_size
    except OSError as e:
        raise BundleError(f"cannot read {local}: {e.strerror}; exclude it") from e


def _too_large(sizes: dict[str, int], limit: int, root: Path) -> None:
    biggest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    raise BundleTooLarge(sum(sizes.values()), limit, [BundleFile(p, s) for p, s in biggest], root)


def _too_many(found: dict[str, Path]) -> None:
    tops = Counter(p.split("/")[0] if "/" in p else "" for p in found)
    top, n = tops.most_common(1)[0]
    where = f"{top}/ holds {n:,} of them" if top else f"the app's directory itself holds {n:,}"
    raise BundleError(
        f"the bundle has more than {MAX_FILES:,} files; {where}. Exclude what the app does not "
        f"need with a {IGNORE_FILE} (gitignore syntax)"
    )


def _zip(contents: dict[str, bytes]) -> bytes:
    """The same files give the same bytes: sorted entries, one timestamp, one mode."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(contents):
            info = zipfile.ZipInfo(path, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the mode below means the same everywhere
            info.external_attr = (stat.S_IFREG | _FILE_MODE) << 16
            zf.writestr(info, contents[path], compresslevel=6)
    return buf.getvalue()


def open_bundle(
    data: bytes, *, limit: int = DEFAULT_LIMIT, max_files: int = MAX_FILES
) -> list[tuple[str, bytes]]:
    """Server side: the files of an uploaded zip, checked as untrusted input. Sizes are bounded
    while reading, so a zip bomb stops at the limit instead of filling memory."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise BundleError(f"the bundle is not a zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise BundleError(f"the bundle has {len(infos):,} entries, over {max_files:,}")
        files: list[zipfile.ZipInfo] = []
        for info in infos:
            name = info.orig_filename.rstrip("/") if info.is_dir() else info.orig_filename
            check_path(name)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise BundleError(f"{name!r} is a symlink: a bundle holds files only")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise BundleError(f"{name!r} is not a regular file")
            if info.flag_bits & 0x1:
                raise BundleError(f"{name!r} is encrypted")
            if not info.is_dir():
                files.append(info)
        _check_tree(info.orig_filename for info in files)
        declared = sum(info.file_size for info in files)
        if declared > limit:
            raise BundleError(
                f"the bundle declares {human(declared)} uncompressed, over the {human(limit)} limit"
            )
        out: list[tuple[str, bytes]] = []
        total = 0
        for info in files:
            content = _read(zf, info, limit - total)
            total += len(content)
            out.append((info.orig_filename, content))
    return sorted(out)


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """One entry, reading at most one byte past `budget`, whatever its header claims."""
    name = info.orig_filename
    try:
        with zf.open(info) as f:
            content = f.read(budget + 1)
    except _READ_ERRORS as e:
        raise BundleError(f"{name!r} cannot be read: {e}") from None
    if len(content) > budget:
        raise BundleError(f"the bundle unpacks to more than {human(budget)} at {name!r}")
    if len(content) != info.file_size:
        raise BundleError(f"{name!r} is not the size its header declares")
    return content


def extract(files: Iterable[tuple[str, bytes]], dest: Path) -> None:
    """Write the files under `dest`, which must not exist yet or be empty. They are written into a
    temporary sibling, synced, then renamed into place, so a crash never leaves a half-written
    bundle where a worker would import it."""
    files = list(files)
    _check_tree(path for path, _ in files)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise BundleError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise BundleError(f"{dest} is not empty: a bundle is written once, into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        dirs = {tmp}
        for path, content in files:
            target = tmp.joinpath(*path.split("/"))
            for parent in reversed(target.parents):
                if parent not in dirs and parent.is_relative_to(tmp):
                    parent.mkdir()
                    os.chmod(parent, _DIR_MODE)
                    dirs.add(parent)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
            with open(fd, "wb") as f:
                f.write(content)
                os.fchmod(fd, _FILE_MODE)
                os.fsync(fd)
        for d in dirs:
            _fsync_dir(d)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            raise BundleError(f"{dest} appeared while the bundle was written: {e.strerror}") from e
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

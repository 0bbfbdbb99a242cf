"""Building an Env with uv: a virtual environment, its lock resolved, its packages installed.

Each Env is a venv of its own under the server's env dir. Its packages come out of uv's cache as
hard links (uv's default on Linux), so a second Env with the AI base costs the disk of its own
packages and a few directory entries, not another copy of torch. ember's worker runtime reaches
the venv through a `.pth` file naming a directory that holds only the `ember` package: the
worker imports its Env's packages and ember, nothing else of the server's. A `.pth` path comes
after the venv's own site-packages, so a function that pins a package ember happens to use
gets its own pin.

Only wheels are installed (`--no-build`): building a source distribution would run a package's
own setup code on the server, as the server's user; and the check that the runtime imports runs
without `site`, so that no package's `.pth` file runs its code here either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ember
from ember.envs.pipconf import PackageSources

Progress = Callable[[str, str], None]
"""(phase, detail): phase is one of `venv`, `resolve`, `download`, `install`, `check`."""

READY = ".ember-ready"
"""Written last into a built Env's directory: a directory without it is a build that died."""


class BuildError(RuntimeError):
    """A build that failed; `log` holds what uv said."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class Plan:
    """What to build (decided by `ember.control.environments`, built here)."""

    id: str
    python: str
    """What uv is given as `--python`: an interpreter's path, or a version such as `3.12`."""
    requirements: tuple[str, ...] = ()
    """To resolve; empty with `lock`."""
    constraints: tuple[str, ...] = ()
    """Pins the resolution must keep (the AI base's lock, less what the function names)."""
    lock: tuple[str, ...] | None = None
    """Installed exactly as given (`Env.from_lock`)."""
    base_dir: Path | None = None
    """A built Env this one stands on (the AI base): its bytecode is shared by hard link."""


@dataclass(frozen=True)
class Built:
    id: str
    dir: Path
    python: Path
    """The venv's interpreter: what its workers run."""
    python_version: str
    lock: str
    disk_bytes: int
    """All its files."""
    own_bytes: int
    """Of those, what no other Env or uv's cache shares by hard link: what removing it frees."""
    build_s: float


def uv_bin() -> str:
    """uv as installed with ember (the `uv` package), else the one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise BuildError("uv is not installed: pip install uv") from None
        return found


def server_python() -> str:
    """The interpreter the server runs on, not its venv's wrapper: an Env's venv is made from it."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def runtime_dir(envs_dir: Path) -> Path:
    """A directory holding only ember's package (a link to it): what an Env's `.pth` names."""
    source = Path(ember.__file__).resolve().parent
    tag = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    d = envs_dir / ".runtime" / tag
    link = d / "ember"
    if not link.exists():
        d.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            link.symlink_to(source, target_is_directory=True)
    return d


def disk_use(root: Path) -> tuple[int, int]:
    """(bytes of every file, bytes of the files nothing else links to)."""
    total = own = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
            if st.st_nlink == 1:
                own += st.st_size
    return total, own


class Builder:
    def __init__(self, envs_dir: Path, sources: PackageSources, cache_dir: Path | None = None):
        self.envs_dir = envs_dir
        self.sources = sources
        self.cache_dir = cache_dir
        self.uv = uv_bin()

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA"))
        }
        env.update({"NO_COLOR": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"})
        if self.cache_dir is not None:
            env["UV_CACHE_DIR"] = str(self.cache_dir)
        return env

    async def _uv(self, args: list[str], log: list[str], on_line: Callable[[str], None]) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.uv,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(),
        )
        assert proc.stdout is not None
        try:
            while raw := await proc.stdout.readline():
                line = raw.decode(errors="replace").rstrip()
                log.append(line)
                on_line(line)
            code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if code != 0:
            raise BuildError(_reason(log), "\n".join(log))

    async def build(self, plan: Plan, progress: Progress) -> Built:
        """Build `plan` into its directory (a half-built one from a crash is removed first)."""
        t0 = time.perf_counter()
        dest = self.envs_dir / plan.id
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        log: list[str] = []
        try:
            progress("venv", "creating the virtual environment")
            await self._uv(["venv", "--quiet", str(dest), "--python", plan.python], log, _no)
            python = dest / "bin" / "python"
            lock_path = dest / "ember-lock.txt"
            if plan.lock is not None:
                lock_path.write_text("\n".join(plan.lock) + "\n")
            elif plan.requirements:
                progress("resolve", f"resolving {len(plan.requirements)} requirement(s)")
                (dest / "ember-requirements.in").write_text("\n".join(plan.requirements) + "\n")
                args = ["pip", "compile", str(dest / "ember-requirements.in")]
                args += ["-o", str(lock_path), "--generate-hashes", "--no-build", "--quiet"]
                args += ["--no-header", "--no-annotate", "--python", str(python)]
                args += self.sources.uv_args()
                constraints = [*self.sources.constraints]
                if plan.constraints:
                    pins = dest / "ember-constraints.txt"
                    pins.write_text("\n".join(plan.constraints) + "\n")
                    constraints.append(str(pins))
                for c in constraints:
                    args += ["--constraint", c]
                await self._uv(args, log, _no)
            else:
                lock_path.write_text("")
            lock = lock_path.read_text()
            if lock.strip():
                progress("download", "downloading")

                def phase(line: str) -> None:
                    if line.startswith("Prepared"):
                        progress("install", "installing")

                args = ["pip", "sync", str(lock_path), "--python", str(python)]
                args += ["--require-hashes", "--no-build", "--link-mode", "hardlink"]
                args += self.sources.uv_args()
                await self._uv(args, log, phase)
                progress("compile", "compiling bytecode")
                await self._compile(dest, python, plan.base_dir, log)
            progress("check", "checking that the worker runtime imports")
            version = await self._finish(dest, python, log)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        (dest / READY).write_text(version)
        disk, own = disk_use(dest)
        return Built(plan.id, dest, python, version, lock, disk, own, time.perf_counter() - t0)

    async def _compile(
        self, dest: Path, python: Path, base_dir: Path | None, log: list[str]
    ) -> None:
        """Bytecode for every module, written now: a worker sees its Env read-only, so without
        it each new process would compile what it imports (torch: seconds). What the base has
        compiled for the very same file (the same inode, a hard link from uv's cache) is linked,
        not compiled again, so an Env on the AI base adds only its own packages' bytecode.
        compileall compiles; it imports nothing of the packages, and runs without `site`."""
        site = _site(dest)
        if base_dir is not None and (base_site := _site(base_dir)) is not None and site:
            await asyncio.to_thread(share_bytecode, base_site, site)
        if site is None:
            return
        proc = await asyncio.create_subprocess_exec(
            str(python),
            "-I",
            "-S",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            str(site),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(dest)},
        )
        out, _ = await proc.communicate()
        if out:
            log.extend(out.decode(errors="replace").splitlines()[-50:])
        # a file that does not compile (a test fixture of some package) is not fatal: Python
        # compiles it in memory if it is ever imported

    async def _finish(self, dest: Path, python: Path, log: list[str]) -> str:
        """ember's runtime into the venv, and a first import of it there."""
        site = sorted((dest / "lib").glob("python3*/site-packages"))
        if not site:
            raise BuildError(f"uv made no site-packages under {dest}", "\n".join(log))
        runtime = runtime_dir(self.envs_dir)
        (site[0] / "_ember_runtime.pth").write_text(str(runtime) + "\n")
        # Without `site` (-S): a package's own .pth file would otherwise run its code here, on
        # the server, outside any sandbox. What the worker imports is checked all the same, on
        # the paths the .pth files name; the code itself runs only in workers.
        check = (
            "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import ember.worker.runtime; "
            "print('%d.%d.%d' % sys.version_info[:3])"
        )
        proc = await asyncio.create_subprocess_exec(
            str(python),
            "-I",
            "-S",
            "-c",
            check,
            str(runtime),
            str(site[0]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(dest)},
        )
        out, _ = await proc.communicate()
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise BuildError(
                f"the Env's Python cannot import ember's worker runtime: {text[-500:]}",
                "\n".join(log),
            )
        return text.splitlines()[-1]


def _site(venv: Path) -> Path | None:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    return found[0] if found else None


def share_bytecode(base_site: Path, site: Path) -> int:
    """Hard-link the base's `.pyc` of each module whose source both venvs share (one inode):
    the same source compiles to the same bytes. Returns how many were linked."""
    linked = 0
    for pyc in base_site.rglob("__pycache__/*.pyc"):
        source = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
        rel = source.relative_to(base_site)
        mine = site / rel
        try:
            if os.stat(mine).st_ino != os.stat(source).st_ino:
                continue
            target = site / pyc.relative_to(base_site)
            target.parent.mkdir(exist_ok=True)
            os.link(pyc, target)
        except (FileNotFoundError, FileExistsError):
            continue
        linked += 1
    return linked


def _no(line: str) -> None:
    return None


_DECORATION = "\u00d7\u2570\u2500\u25b6\u2502 "
"""The box-drawing marks uv draws around its error messages."""


def _reason(log: list[str]) -> str:
    """uv's own message, without its decoration: what names the package that failed."""
    lines = [ln.strip().lstrip(_DECORATION).strip() for ln in log if ln.strip()]
    lines = [ln for ln in lines if ln and not ln.startswith(("Using ", "Resolved ", "Creating "))]
    text = " ".join(lines[-12:])
    return text[-1500:] or "uv failed without saying why"


def is_built(envs_dir: Path, env_id: str) -> bool:
    return (envs_dir / env_id / READY).is_file()

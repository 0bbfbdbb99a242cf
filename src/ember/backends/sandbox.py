"""What a worker may see: the sandbox each template and worker process runs in.

User code is untrusted: another tenant may have written it. On Linux with bubblewrap (`bwrap`,
the sandbox Flatpak uses) every template and every plainly started worker runs in a sandbox of its
own: new mount, PID, IPC and UTS namespaces, a root file system holding only the system's and
Python's files (read-only), the function's bundle (read-only), a private `/tmp`, and the control
socket. Not there: the data dir (the operator token, `master.key`, the database, other bundles,
logs), the home directories, the server's environment, other processes. Workers forked from a
template stay in the template's sandbox, so a forked cold start costs what it did without one.
`block_network=True` adds a network namespace of its own with only a loopback device. When the
server runs as root, the code inside runs as `nobody`, not as root.

This module only builds the command line and the environment; `backends/local.py` starts them.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ember

CONTROL_DIR = "/run/ember"
"""Where the control socket appears inside a sandbox."""
CONTROL_SOCKET = f"{CONTROL_DIR}/control.sock"

NOBODY = 65534
"""The uid and gid user code runs as when the server is root."""

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
ETC_FILES = (
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/pki",
    "/etc/protocols",
    "/etc/resolv.conf",
    "/etc/services",
    "/etc/ssl",
    "/etc/timezone",
)
"""The few files of /etc that programs need (name resolution, TLS roots, the dynamic linker);
not /etc as a whole, which holds the machine's own secrets and configuration."""

PASSED_ENV = ("LANG", "LANGUAGE", "TZ", "TERM", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PASSED_ENV_PREFIXES = ("LC_", "HF_", "TRANSFORMERS_", "OMP_", "MKL_", "NVIDIA_", "TORCH_")
"""What of the server's environment reaches user code in a sandbox: locale, the machine's
numeric library quirks and model-loading switches (offline mode). Nothing else: the server's
environment is the operator's."""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; the message says why and what to do."""


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def probe(bwrap: str | None = None) -> str | None:
    """None when sandboxes can be made here, else why not (for `ember doctor` and the server).
    Tried once per process: it starts a sandbox."""
    return _probe(bwrap or find_bwrap())


@functools.cache
def _probe(bwrap: str | None) -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the worker sandbox needs Linux (this is {sys.platform})"
    if bwrap is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    import subprocess

    argv = [bwrap, *_base_args(ro_paths=[], root=os.geteuid() == 0), "--", "/bin/true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run: {exc}"
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
        return (
            f"bubblewrap cannot make a sandbox here ({reason}); unprivileged user namespaces "
            "may be disabled (sysctl kernel.unprivileged_userns_clone=1)"
        )
    return None


def server_python_paths() -> list[str]:
    """The directories the server's Python and its packages live in, and ember's own source
    (an editable install keeps it outside site-packages)."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        str(Path(ember.__file__).resolve().parent.parent),
    }
    here = os.getcwd()
    for entry in sys.path[1:]:  # sys.path[0] is the script's or the working dir: not the code's
        if entry and entry != here and os.path.isdir(entry):
            paths.add(entry)
    return _outermost(os.path.realpath(p) for p in paths if os.path.exists(p))


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths, less those inside another of them."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _base_args(ro_paths: Iterable[str], root: bool) -> list[str]:
    args = [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "ember-worker",
        "--die-with-parent",
        "--new-session",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--tmpfs",
        "/dev/shm",
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--perms",
        "1777",
        "--tmpfs",
        "/var/tmp",
    ]
    if root:
        # bwrap as root does the mounts; the worker then drops to `nobody` before user code runs
        # (it needs these two capabilities for that, and loses them with the switch).
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/var"]
    for path in ETC_FILES:
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    for path in ro_paths:
        args += [*_parents(path), "--ro-bind", path, path]
    return args


def _parents(path: str) -> list[str]:
    """Make the directories above `path` traversable: bwrap would create them private to root,
    and a worker that runs as `nobody` could not reach what is bound below them."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        args += ["--perms", "0755", "--dir", "/" + "/".join(parts[: i + 1])]
    return args


@dataclass(frozen=True)
class Sandbox:
    """How to wrap a worker's command in bubblewrap on this machine."""

    bwrap: str
    data_dir: Path
    control_socket: Path
    """The server's side of the control socket, bound at `CONTROL_SOCKET` inside."""

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    def wrap(
        self,
        argv: list[str],
        *,
        bundle_dir: Path,
        block_network: bool = False,
        gpus: bool = False,
        python_paths: list[str] | None = None,
    ) -> list[str]:
        """`argv` run inside a new sandbox that sees `bundle_dir` (read-only), and the server's
        Python, or (`python_paths`) only those paths and ember's own package: a built Env."""
        data = os.path.realpath(self.data_dir)
        if python_paths is None:
            code = server_python_paths()
        else:
            ember_pkg = str(Path(ember.__file__).resolve().parent)
            code = _outermost(os.path.realpath(p) for p in [*python_paths, ember_pkg])
        args = [self.bwrap, *_base_args(code, self.as_root)]
        for path in code:  # a data dir inside Python's tree (unusual) stays hidden all the same
            if python_paths is None and (data == path or data.startswith(path.rstrip("/") + "/")):
                args += ["--tmpfs", data]
        args += ["--ro-bind", "/sys", "/sys"]
        if gpus:
            for dev in sorted(Path("/dev").glob("nvidia*")):
                args += ["--dev-bind-try", str(dev), str(dev)]
            if Path("/dev/dri").exists():
                args += ["--dev-bind-try", "/dev/dri", "/dev/dri"]
        if block_network:
            args += ["--unshare-net"]
        bundle = os.path.realpath(bundle_dir)
        args += [*_parents(bundle), "--ro-bind", bundle, bundle]
        args += ["--perms", "0755", "--dir", CONTROL_DIR]
        args += ["--bind", str(self.control_socket), CONTROL_SOCKET]
        args += ["--remount-ro", "/", "--chdir", bundle, "--", *argv]
        return args

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The environment of a sandboxed process: a few harmless variables of the server's,
        then `extra` (the worker's own: its function, GPUs, secrets)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)
        }
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                "HOME": "/tmp",
                "TMPDIR": "/tmp",
                "PYTHONDONTWRITEBYTECODE": "1",
                "EMBER_SANDBOX": "bwrap",
            }
        )
        if self.as_root:
            env["EMBER_RUN_AS"] = str(NOBODY)
        env.update(extra)
        return env


SANDBOX_MODES = ("auto", "bwrap", "off")


def make_sandbox(
    mode: str, data_dir: Path, control_socket: Path
) -> tuple[Sandbox | None, str | None]:
    """The sandbox the server's workers run in, or None and why not: `auto` takes bubblewrap
    where it works here, `bwrap` insists on it (SandboxUnavailable says why not), `off` runs
    workers unsandboxed."""
    if mode not in SANDBOX_MODES:
        raise SandboxUnavailable(
            f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}"
        )
    if mode == "off":
        return None, "the server runs with --sandbox off"
    bwrap = find_bwrap()
    reason = probe(bwrap)
    if reason is not None or bwrap is None:
        if mode == "bwrap":
            raise SandboxUnavailable(f"--sandbox bwrap: {reason}")
        return None, reason
    return Sandbox(bwrap, data_dir, control_socket), None

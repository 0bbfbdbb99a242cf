"""Where packages come from: the machine's pip configuration, given to uv.

uv reads no pip configuration, yet a machine's operator has usually put its package index, a
mirror or a directory of wheels there (`pip config list` shows them). Builds honour the same
settings pip would: `index-url`, `extra-index-url`, `find-links` and `constraint`, from pip's
configuration files and `PIP_*` variables, later ones winning as in pip.
"""

from __future__ import annotations

import configparser
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackageSources:
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    no_index: bool = False
    """pip's `no-index`: packages from the find-links folders alone."""

    def uv_args(self) -> list[str]:
        """uv's flags for these sources. With several indexes uv would by default take each
        package from the first index that has it; pip takes the best version across all of them,
        and so does a build here (`unsafe-best-match`), so that it resolves as pip would."""
        args: list[str] = ["--no-index"] if self.no_index else []
        if self.index_url and not self.no_index:
            args += ["--index-url", self.index_url]
        for url in () if self.no_index else self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        if self.extra_index_urls or self.find_links:
            args += ["--index-strategy", "unsafe-best-match"]
        return args


def _config_files() -> list[Path]:
    """pip's configuration files, in the order pip reads them (later wins)."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg)] + [Path("/etc/pip.conf")]
    home = Path.home()
    files += [
        home / ".pip" / "pip.conf",
        Path(os.environ.get("XDG_CONFIG_HOME", home / ".config")) / "pip" / "pip.conf",
    ]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    if sys.prefix != sys.base_prefix:
        files.append(Path(sys.prefix) / "pip.conf")
    return files


def _split(value: str) -> list[str]:
    return [v for v in re.split(r"\s+", value.strip()) if v]


def _reachable(url: str) -> bool:
    """A local index or wheel folder that is not there is skipped, as pip skips it (with a
    warning); uv would fail the whole build on it."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://")).exists()
    if "://" not in url:
        return Path(url).exists()
    return True


def package_sources() -> PackageSources:
    """This machine's pip settings (files, then `PIP_*` variables), as pip itself would read
    them for `pip install`."""
    settings: dict[str, str] = {}
    for path in _config_files():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                settings.update(parser.items(section))
    for key in ("index-url", "extra-index-url", "find-links", "constraint", "no-index"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env is not None:
            settings[key] = env
    index_url = settings.get("index-url") or None
    if index_url is not None and not _reachable(index_url):
        index_url = None
    no_index = settings.get("no-index", "").lower() in ("1", "true", "yes", "on")
    return PackageSources(
        index_url=index_url,
        extra_index_urls=tuple(
            u for u in _split(settings.get("extra-index-url", "")) if _reachable(u)
        ),
        find_links=tuple(u for u in _split(settings.get("find-links", "")) if _reachable(u)),
        constraints=tuple(c for c in _split(settings.get("constraint", "")) if Path(c).is_file()),
        no_index=no_index,
    )


def local_wheel(name: str, sources: PackageSources, python_tag: str) -> str | None:
    """The newest version of `name` lying as a wheel for `python_tag` (`cp311`) in a local
    find-links directory, or None: how the AI base picks the torch build a machine provides
    (a CPU build on disk, say) instead of whatever the index would download."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    best: Version | None = None
    for link in sources.find_links:
        folder = Path(link.removeprefix("file://"))
        if not folder.is_dir():
            continue
        for wheel in folder.glob("*.whl"):
            try:
                project, version, _, tags = parse_wheel_filename(wheel.name)
            except InvalidWheelFilename:
                continue
            if project != canonicalize_name(name):
                continue
            if not any(t.interpreter in (python_tag, "py3") for t in tags):
                continue
            if best is None or version > best:
                best = version
    return None if best is None else str(best)

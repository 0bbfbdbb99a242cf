"""Worker output, one JSON line per printed line, tagged with its job id, in
`logs/WORKSPACE/APP.jsonl` (callers name an app `WORKSPACE/APP`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

TAIL_BYTES = 4 * 2**20


class LogStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[str]] = {}

    def path(self, app: str) -> Path:
        return self.root / f"{app}.jsonl"

    def append(self, app: str, function: str, record: dict[str, Any]) -> None:
        f = self._files.get(app)
        if f is None:
            path = self.path(app)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[app] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(
        self, app: str, function: str, *, tail: int = 100, since: float = 0.0
    ) -> list[dict[str, Any]]:
        """The last `tail` lines of `function` (or of its class, for lines outside any job)."""
        self.flush()
        path = self.path(app)
        if not path.exists():
            return []
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            chunk = f.read().decode("utf-8", errors="replace")
        unit = function.split(".")[0]
        out = []
        for line in chunk.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the first line of a chunk may be cut
            if rec["ts"] > since and rec["function"] in (function, unit):
                out.append(rec)
        return out[-tail:] if tail > 0 else out

"""Worker output, one JSON line per printed line, tagged with its job id, in
`logs/WORKSPACE/APP.jsonl` (callers name an app `WORKSPACE/APP`).

Bounded, so no tenant grows the disk without end: each job keeps at most `job_bytes` of printed
output (and each worker as much for lines outside any job), past which one marker line says the
rest was dropped; and each app's file is rotated at `file_bytes`, keeping the current file and
the one before (`APP.jsonl.1`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from ember.control.records import Pool, Worker
from ember.core.names import under
from ember.core.quotas import Quotas, log_marker, log_room

TAIL_BYTES = 4 * 2**20
OWNERS = 16_384
"""Jobs and workers whose kept log bytes are remembered (the least recently logging forgotten
first): enough for every job running at once, and a bound on the memory the caps cost."""


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class LogStore:
    def __init__(self, root: Path, quotas: Quotas | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        quotas = quotas or Quotas()
        self.job_bytes = quotas.max_job_log_bytes
        self.file_bytes = quotas.max_app_log_bytes
        self._files: dict[str, IO[str]] = {}
        self._sizes: dict[str, int] = {}
        """Bytes in each open file, to rotate it without a stat per line."""
        self._kept: OrderedDict[str, int] = OrderedDict()
        """Job id (or app and `worker ID`) -> bytes of its lines kept; past the cap, its marker
        is out."""

    def path(self, app: str) -> Path:
        workspace, _, name = app.rpartition("/")
        return under(self.root, *([workspace] if workspace else []), f"{name}.jsonl")

    def previous(self, app: str) -> Path:
        """The file before the current one, once the current one has been rotated."""
        path = self.path(app)
        return path.with_name(path.name + ".1")

    def worker_lines(self, w: Worker, lines: list[list[Any]]) -> None:
        """What a worker printed: [job id or None, stream, line, ts] each."""
        for job_id, stream, line, ts in lines:
            job = w.running.get(job_id) if job_id else None
            fn = job.function if job else w.pool.unit
            self._line(w.pool, w.id, job_id, fn, stream, line, ts)

    def template_lines(self, pool: Pool, lines: list[list[Any]]) -> None:
        """What the user's module printed in its template (at import, in snap hooks)."""
        for _, stream, line, ts in lines:
            self._line(pool, "template", None, pool.unit, stream, line, ts)

    def _line(
        self, pool: Pool, worker: str, job: str | None, fn: str, stream: str, line: str, ts: float
    ) -> None:
        record = {"ts": ts, "job": job, "worker": worker, "function": fn}
        self.append(f"{pool.workspace}/{pool.app}", fn, {**record, "stream": stream, "line": line})

    def append(self, app: str, function: str, record: dict[str, Any]) -> None:
        """Write one line, unless its job (or worker) is past its cap: the line that passes it
        becomes the marker, the ones after it are dropped."""
        job = record.get("job")
        owner = job or f"worker {record.get('worker')}"
        key = job or f"{app}\0{function}\0{owner}"  # per worker (a template's: per unit)
        used = self._kept.pop(key, 0)
        size = _size(str(record.get("line", "")))
        room = log_room(used, size, self.job_bytes)
        if room.keep:
            used += size
        elif room.marker:
            record = {**record, "line": log_marker(self.job_bytes, owner)}
            used = self.job_bytes + 1
        self._kept[key] = used
        if len(self._kept) > OWNERS:
            self._kept.popitem(last=False)
        if room.keep or room.marker:
            self._write(app, json.dumps(record, ensure_ascii=False) + "\n")

    def _write(self, app: str, text: str) -> None:
        f = self._files.get(app)
        n = _size(text)
        if f is not None and self._sizes[app] + n > self.file_bytes:
            f.close()
            del self._files[app]
            os.replace(self.path(app), self.previous(app))  # the one before that is gone
            f = None
        if f is None:
            path = self.path(app)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[app] = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self._sizes[app] = path.stat().st_size
        f.write(text)
        self._sizes[app] += n

    def flush(self) -> None:
        for f in list(self._files.values()):
            with contextlib.suppress(ValueError):  # closed by a rotation since the list was taken
                f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(
        self,
        app: str,
        function: str,
        *,
        tail: int = 100,
        since: float = 0.0,
        job: str | None = None,
    ) -> list[dict[str, Any]]:
        """The last `tail` lines of `function` (or of its class, for lines outside any job);
        with `job`, that job's lines only."""
        self.flush()
        chunk = b""
        for path in (self.path(app), self.previous(app)):  # newest first, up to TAIL_BYTES
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - (TAIL_BYTES - len(chunk))))
                    chunk = f.read() + chunk
            except FileNotFoundError:
                continue
            if len(chunk) >= TAIL_BYTES:
                break
        unit = function.split(".")[0]
        out = []
        for line in chunk.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the first line of a chunk may be cut
            # a class (`function` is its unit) shows its methods' lines too
            fn = rec["function"]
            if job is not None and rec.get("job") != job:
                continue
            if rec["ts"] > since and (fn in (function, unit) or fn.startswith(function + ".")):
                out.append(rec)
        return out[-tail:] if tail > 0 else out

"""Each worker has its own credential for the control port, good for that worker alone.

The test's function is itself a worker: it finds its own id and secret (in its process's memory:
the secret is in no environment) and tries to use them to pass as another worker, as itself a
second time, or as another worker's id with a guessed secret. The server must hang up on each
before sending anything, so no job of another function version can be taken or reported.
"""

from __future__ import annotations

from conftest import Server, wait_for

APP = """
import json, os, socket, struct
import ember

app = ember.App("creds")

def _connect() -> socket.socket:
    control = os.environ["EMBER_CONTROL"]
    if control.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(control[5:])
        return s
    host, port = control.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)

def _mine():
    import gc
    from ember.worker.runtime import Worker
    return next(o for o in gc.get_objects() if isinstance(o, Worker))

def _hello(worker: str, secret: str) -> bytes:
    with _connect() as s:
        body = json.dumps({"t": "hello", "worker": worker, "secret": secret, "pid": 1}).encode()
        s.sendall(struct.pack("!I", len(body)) + body)
        # A worker the server accepts gets its jobs on this connection; a refused one, EOF.
        s.settimeout(2)
        try:
            return s.recv(1024)
        except TimeoutError:
            return b"<still open>"

@app.function()
def probe(other: str) -> dict:
    me = _mine()
    return {
        "secret_in_env": "EMBER_WORKER_SECRET" in os.environ,
        "as_other_with_my_secret": _hello(other, me.secret).decode(),
        "as_me_with_a_guess": _hello(me.id, "0" * len(me.secret)).decode(),
        "as_me_again": _hello(me.id, me.secret).decode(),
    }

@app.function(min_workers=1)
def other() -> str:
    return "other"
"""


def test_a_worker_credential_is_good_for_that_worker_only(server: Server) -> None:
    server.deploy(APP)

    def other_worker() -> str | None:
        for w in server.http("GET", "/v1/workers").json()["workers"]:
            if w["unit"] == "other" and w["state"] == "IDLE":
                return str(w["id"])
        return None

    other_id = wait_for(other_worker, timeout=30, what="the other function's worker")
    out = server.function("creds", "probe").remote(other=other_id)
    assert out["secret_in_env"] is False
    assert out["as_other_with_my_secret"] == ""
    assert out["as_me_with_a_guess"] == ""
    assert out["as_me_again"] == ""  # one connection per worker: a second is not it
    # The impostor connections took nothing: the other worker still serves its own calls.
    assert server.function("creds", "other").remote() == "other"
    assert other_worker() == other_id

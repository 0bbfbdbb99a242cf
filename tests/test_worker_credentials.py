"""Each worker has its own credential for the control port, good for that worker alone.

The test's function is itself a worker: it knows its own id and secret (its environment), and
tries to use them to pass as another worker, or another worker's id with a guessed secret. The
server must hang up on both before sending anything, so no job of another function version can
be taken or reported.
"""

from __future__ import annotations

from conftest import Server, wait_for

APP = """
import json, os, socket, struct
import ember

app = ember.App("creds")

def _hello(worker: str, secret: str) -> bytes:
    host, port = os.environ["EMBER_CONTROL"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
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
    mine = os.environ["EMBER_WORKER_SECRET"]
    return {
        "as_other_with_my_secret": _hello(other, mine).decode(),
        "as_me_with_a_guess": _hello(os.environ["EMBER_WORKER_ID"], "0" * len(mine)).decode(),
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
    assert out["as_other_with_my_secret"] == ""
    assert out["as_me_with_a_guess"] == ""
    # The impostor connections took nothing: the other worker still serves its own calls.
    assert server.function("creds", "other").remote() == "other"
    assert other_worker() == other_id

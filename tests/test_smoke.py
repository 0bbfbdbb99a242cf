"""The shortest path a new user takes: deploy a file, call a function three ways."""

from __future__ import annotations

from conftest import Server

SOURCE = """
import ember

app = ember.App("smoke")

@app.function()
def square(x: int) -> int:
    return x * x

@app.function()
def count(n: int):
    for i in range(n):
        yield i
"""


def test_deploy_and_call(server: Server) -> None:
    deployed = server.deploy(SOURCE)
    bundle = deployed.pop("bundle")
    assert len(bundle) == 64  # the sha256 of the uploaded code
    assert deployed == {
        "app": "smoke",
        "version": 1,
        "functions": ["square", "count"],
        "envs": {},
        "warnings": [],
    }
    square = server.function("smoke", "square")
    assert square.remote(4) == 16
    job = square.spawn(x=5)
    assert job.result(timeout=30) == 25
    assert list(square.map(range(5))) == [0, 1, 4, 9, 16]
    count = server.function("smoke", "count")
    assert list(count.stream(4)) == [0, 1, 2, 3]

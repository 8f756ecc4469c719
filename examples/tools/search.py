"""Search tool of the retrieval agent: keyword search over a small local corpus.

A stand-in for a web or vector-store search: deterministic, offline, a few microseconds a call.
"""

from __future__ import annotations

import re

CORPUS = [
    "Ray Serve composes deployments through handles and scales each one independently.",
    "Triton kernels fuse pointwise operations into the epilogue of a matrix multiplication.",
    "The H100 has 50 MB of L2 cache and about 3.35 TB/s of HBM3 bandwidth.",
    "Batch normalization in eval mode can be folded into the preceding convolution.",
    "vLLM pages the KV cache into fixed-size blocks to serve many sequences at once.",
    "A cross-encoder reranker scores each query and passage pair jointly.",
    "Prometheus scrapes metrics over HTTP and stores them as time series.",
    "torch.compile traces a module with Dynamo and generates kernels with Inductor.",
]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def search(query: str, k: int = 4) -> dict:
    """The k passages sharing the most words with the query, best first."""
    q = _words(query)
    ranked = sorted(CORPUS, key=lambda doc: (-len(q & _words(doc)), doc))
    return {"query": query, "passages": ranked[:k]}

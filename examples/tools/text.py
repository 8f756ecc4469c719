"""Text <-> tensors for the retrieval agent's model stages (their `preprocess` and `postprocess`).

A hashing tokenizer stands in for a trained one (nothing can be downloaded here): each lowercase
word maps to a stable id in [1, 4096) through blake2b, 0 pads. Deterministic across processes,
unlike Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import re

import torch

VOCAB, SEQ = 4096, 64


def _ids(text: str, seq: int = SEQ) -> list[int]:
    words = re.findall(r"[a-z0-9]+", text.lower())[:seq]
    ids = [
        1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % (VOCAB - 1) for w in words
    ]
    return ids + [0] * (seq - len(ids))


def query_and_passages(payload: dict) -> list[torch.Tensor]:
    """embed: {"query", "passages"} -> ids [1 + P, SEQ] (the query first)."""
    texts = [payload["query"], *payload["passages"]]
    return [torch.tensor([_ids(t) for t in texts], dtype=torch.int64)]


def rank_by_similarity(embeddings: torch.Tensor, payload: dict) -> dict:
    """embed: unit embeddings [1 + P, D] -> passages ordered by cosine similarity to the query."""
    scores = (embeddings[1:] @ embeddings[0]).tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {
        "query": payload["query"],
        "passages": [payload["passages"][i] for i in order],
        "similarity": [scores[i] for i in order],
    }


def query_passage_pairs(payload: dict) -> list[torch.Tensor]:
    """rerank: {"query", "passages"} -> (ids, segment) [P, 2 * SEQ], query tokens then passage tokens."""
    ids, segment = [], []
    for passage in payload["passages"]:
        ids.append(_ids(payload["query"]) + _ids(passage))
        segment.append([0] * SEQ + [1] * SEQ)
    return [torch.tensor(ids, dtype=torch.int64), torch.tensor(segment, dtype=torch.int64)]


def top_passages(scores: torch.Tensor, payload: dict, k: int = 2) -> dict:
    """rerank: one score per pair -> the k best passages."""
    order = sorted(range(len(payload["passages"])), key=lambda i: -float(scores[i]))[:k]
    return {"passages": [payload["passages"][i] for i in order], "scores": [float(scores[i]) for i in order]}

"""The voice agent's `listen` postprocess: encoder states -> the text the agent LLM reads.

A stand-in for a speech decoder (nothing can be downloaded here, and the encoder has random
weights): it reports what the encoder saw, so the pipeline runs end to end with real tensors.
"""

from __future__ import annotations

import torch


def describe(states: torch.Tensor, payload: dict) -> dict:
    """states: [B, T, D] encoder output -> {"text": ...} for the LLM."""
    frames = states.shape[1]
    energy = float(states.float().pow(2).mean())
    return {"text": f"(audio: {frames} encoder frames, mean energy {energy:.3f}) What time is it in Tokyo?"}

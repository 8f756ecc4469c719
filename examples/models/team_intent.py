"""The team's own module in the team-models example: an intent head over sentence embeddings.

A plain `nn.Module` class, served as `module: models/team_intent.py:IntentHead` with its constructor
arguments and a safetensors checkpoint (`scripts/build_tiny_models.py` writes one with random weights
under a fixed seed). It still carries a debugging probe from its training days: computed on every call,
read by nothing. hetforge's graph rewrites find and drop it (about 2x on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class IntentHead(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 512, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, classes)
        self.probe = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, d_in] sentence embeddings -> [B, classes] logits
        probe = self.probe(x)  # the leftover: its result is never used
        _ = probe.mean()
        return self.head(self.body(x))

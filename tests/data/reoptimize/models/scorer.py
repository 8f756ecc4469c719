"""A scorer with a leftover: it also runs a copy of its hidden layers whose result it never uses
(a debugging path left in). The re-optimization tests let hetforge find and drop it (about 2x)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 1024, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.probe = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe(x)  # computed on every call, read by nothing
        _ = probe.mean()
        return self.head(self.body(x))


def get_inputs():
    return [torch.randn(4, 16)]


def get_init_inputs():
    return []

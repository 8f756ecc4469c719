"""A small classifier for the serving tests: 16 features -> 2 logits (low, high)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32):
        super().__init__()
        self.hidden = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def get_inputs():
    return [torch.randn(4, 16)]


def get_init_inputs():
    return []

"""Bench problem: a 2-layer GELU MLP, a few ms per call on a 2-core CPU."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + x


def get_inputs():
    return [torch.randn(128, 512)]


def get_init_inputs():
    return [512, 2048]

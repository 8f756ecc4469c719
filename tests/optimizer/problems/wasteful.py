"""Reference that computes a large product it never uses (dead code a rewrite may drop)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.unused = nn.Parameter(torch.randn(768, 768))

    def forward(self, x):
        waste = self.unused @ self.unused @ self.unused
        _ = waste.sum()
        return self.lin(x)


def get_inputs():
    return [torch.randn(4, 64)]


def get_init_inputs():
    return [64]

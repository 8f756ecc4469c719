"""Reference: exp(32 x) with inputs in [0, 1): finite on the draw (at most e^32), overflows beyond it (4x: e^128)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x):
        return torch.exp(x * 32.0)


def get_inputs():
    return [torch.rand(32, 64)]


def get_init_inputs():
    return []

"""Reference: exp(scale * x) with scale 8 and inputs in [0, 1): finite on the draw, overflows beyond it (64 * 8)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x):
        return torch.exp(x * 8.0)


def get_inputs():
    return [torch.rand(32, 64)]


def get_init_inputs():
    return []

"""Reference: relu(x W^T + b) * 2, a small fused chain."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0


def get_inputs():
    return [torch.randn(64, 256)]


def get_init_inputs():
    return [256, 512]


def get_input_variants():
    return [[torch.randn(3, 256)]]

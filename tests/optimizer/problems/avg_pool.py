"""Reference: 1-D average pooling over [B, C, L]."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.pool = nn.AvgPool1d(kernel, stride=kernel)

    def forward(self, x):
        return self.pool(x)


def get_inputs():
    return [torch.randn(8, 32, 512)]


def get_init_inputs():
    return [4]

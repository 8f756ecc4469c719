"""Reference with NaN on purpose: log of signed inputs, scaled."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(128) + 0.5)

    def forward(self, x):
        return torch.log(x) * self.scale


def get_inputs():
    return [torch.randn(32, 128)]


def get_init_inputs():
    return []

"""Legitimate against log_scale: the same NaN pattern, computed through log2."""

import math

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(128) + 0.5)

    def forward(self, x):
        return torch.log2(x) * (self.scale * math.log(2.0))

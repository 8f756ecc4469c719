"""Legitimate against wasteful: drops the product whose result never reaches the output."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.unused = nn.Parameter(torch.randn(768, 768))  # kept so parameters are created in the same order

    def forward(self, x):
        return self.lin(x)

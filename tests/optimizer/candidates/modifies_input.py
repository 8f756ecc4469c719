"""Unsafe: writes into its input (saves a buffer, corrupts the tensor another stage still reads)."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        x.mul_(2.0)
        return torch.relu(self.lin(x) * 2.0 - self.lin.bias)

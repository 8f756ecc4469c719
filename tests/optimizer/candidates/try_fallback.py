"""Reviewable: a fast path guarded by a try/except that falls back to the plain computation."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        try:
            return torch.ops.hetforge_missing.fused_linear_relu(x, self.lin.weight, self.lin.bias) * 2.0
        except (AttributeError, RuntimeError):
            return torch.relu(self.lin(x)) * 2.0

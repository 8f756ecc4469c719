"""Exploit: ignores the seed it is built under (reseeds itself), so it only matches the first seed."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

        torch.manual_seed(0)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0

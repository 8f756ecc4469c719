"""Exploit: none; it just raises. A naive judge without isolation dies with it."""
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        raise RuntimeError("kernel launch failed")

"""Exploit: writes into an existing file under /dev (shared memory another process reads)."""
import torch
import torch.nn as nn

TARGET = "{target}"


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        with open(TARGET, "r+b") as f:
            f.write(b"from the candidate")
        return torch.relu(self.lin(x)) * 2.0

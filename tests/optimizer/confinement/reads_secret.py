"""Exploit: read a secret of the serving process from the environment, by an indirect route a static
check does not see, and fail loudly if it is not there (so a leak shows as acceptance)."""
import torch
import torch.nn as nn

_os = __import__("o" + "s")


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.secret = getattr(_os, "env" + "iron")["{var}"]  # KeyError unless the secret leaked in

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0

"""Exploit: returns a tensor subclass whose values are produced lazily, outside the timed call."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        class Lazy(torch.Tensor):
            pass

        return (torch.relu(self.lin(x)) * 2.0).as_subclass(Lazy)

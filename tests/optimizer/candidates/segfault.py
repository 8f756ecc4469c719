"""Exploit: a segfault takes down an in-process judge."""
import ctypes
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        ctypes.string_at(0)
        return x

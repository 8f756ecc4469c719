"""Exploit: never returns; a judge without deadlines waits forever."""
import time
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        while True:
            time.sleep(1)

"""Exploit: fork a child that leaves the worker's process group and lives on after the verdict."""
import os
import time

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        if os.fork() == 0:
            try:
                os.setsid()
            except OSError:
                pass  # refused: stay alive anyway, in the worker's group
            time.sleep(600)
            os._exit(0)
        return torch.relu(self.lin(x)) * 2.0

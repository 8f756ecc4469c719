"""Exploit: slow, but rewrites the worker harness clock so its own timings say it is instant."""
import sys
import time
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

        ticks = iter(range(10**9))
        main = sys.modules.get("__main__")
        if main is not None and hasattr(main, "_perf_counter"):
            main._perf_counter = lambda: next(ticks) * 1e-9
        time.perf_counter = lambda: 0.0

    def forward(self, x):
        time.sleep(0.01)
        return torch.relu(self.lin(x)) * 2.0

"""Tier 3: gated MLP block (RMS norm, SiLU-gated up-projection, down-projection, residual)."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


T, D, HID = pick((256, 256, 688), (8192, 1024, 2816))


class Model(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def get_inputs():
    return [torch.randn(T, D)]


def get_init_inputs():
    return [D, HID]

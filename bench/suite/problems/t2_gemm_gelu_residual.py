"""Tier 2: linear -> GELU -> residual add."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


M, D = pick((256, 512), (4096, 4096))


class Model(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return F.gelu(self.lin(x)) + x


def get_inputs():
    return [torch.randn(M, D)]


def get_init_inputs():
    return [D]

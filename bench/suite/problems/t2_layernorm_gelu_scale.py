"""Tier 2: layer norm -> GELU -> scale."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


R, D = pick((4096, 512), (32768, 4096))


class Model(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return F.gelu(self.norm(x)) * 0.5


def get_inputs():
    return [torch.randn(R, D)]


def get_init_inputs():
    return [D]

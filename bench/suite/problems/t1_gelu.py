"""Tier 1: GELU, one pointwise op."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


N = pick(1 << 20, 3 << 27)


class Model(nn.Module):
    def forward(self, x):
        return F.gelu(x)


def get_inputs():
    return [torch.randn(N)]


def get_init_inputs():
    return []

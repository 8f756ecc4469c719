"""Tier 2: a long pointwise chain with a residual."""

import os

import torch
import torch.nn as nn


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


N = pick(1 << 20, 1 << 26)


class Model(nn.Module):
    def forward(self, x, y):
        h = torch.sigmoid(x * 1.5 + 0.25)
        h = h * y
        return torch.tanh(h - 0.5).abs() * 3.0


def get_inputs():
    return [torch.randn(N), torch.randn(N)]


def get_init_inputs():
    return []

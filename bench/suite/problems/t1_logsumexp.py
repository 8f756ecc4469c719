"""Tier 1: log-sum-exp over the last dim."""

import os

import torch
import torch.nn as nn


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


R, D = pick((4096, 512), (32768, 4096))


class Model(nn.Module):
    def forward(self, x):
        return torch.logsumexp(x, dim=-1)


def get_inputs():
    return [torch.randn(R, D)]


def get_init_inputs():
    return []

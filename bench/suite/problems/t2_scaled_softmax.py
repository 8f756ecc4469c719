"""Tier 2: scale -> softmax (attention scores)."""

import os

import torch
import torch.nn as nn


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


B, S = pick((8, 512), (48, 2048))


class Model(nn.Module):
    def forward(self, scores):
        return torch.softmax(scores * 0.125, dim=-1)


def get_inputs():
    return [torch.randn(B, S, S)]


def get_init_inputs():
    return []

"""Tier 2: convolution -> + channel bias -> tanh -> scale -> hardswish."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


B, C, H = pick((4, 32, 32), (48, 128, 56))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(c, 1, 1) * 0.1)

    def forward(self, x):
        return F.hardswish(torch.tanh(self.conv(x) + self.bias) * 2.0)


def get_inputs():
    return [torch.randn(B, C, H, H)]


def get_init_inputs():
    return [C]

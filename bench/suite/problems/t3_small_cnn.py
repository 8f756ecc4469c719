"""Tier 3: a small CNN (three conv-BN-ReLU stages, global pool, linear head)."""

import os

import torch
import torch.nn as nn


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


B, H = pick((8, 32), (128, 64))


class Model(nn.Module):
    def __init__(self, classes):
        super().__init__()
        layers = []
        for c_in, c_out in ((3, 64), (64, 128), (128, 256)):
            bn = nn.BatchNorm2d(c_out)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def get_inputs():
    return [torch.randn(B, 3, H, H)]


def get_init_inputs():
    return [100]

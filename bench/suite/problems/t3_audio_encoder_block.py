"""Tier 3: audio encoder block (conv front end with GELU, then a pre-norm MLP), as in Whisper-style encoders."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def pick(cpu, gpu):  # HETFORGE_BENCH_SIZE=gpu: 1-15 ms a call on an H100; cpu (default): a few ms on 2 cores
    return gpu if os.environ.get("HETFORGE_BENCH_SIZE", "cpu") == "gpu" else cpu


B, MELS, FRAMES, D = pick((2, 80, 200, 256), (16, 80, 3000, 512))


class Model(nn.Module):
    def __init__(self, mels, d):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, mel):
        h = F.gelu(self.conv1(mel))
        h = F.gelu(self.conv2(h)).transpose(1, 2)
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


def get_inputs():
    return [torch.randn(B, MELS, FRAMES)]


def get_init_inputs():
    return [MELS, D]

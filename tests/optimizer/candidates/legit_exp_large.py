"""Legitimate against exp_large: exp(32x) as exp(x) to the 32nd power by five squarings."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        y = torch.exp(x)
        for _ in range(5):
            y = y * y
        return y

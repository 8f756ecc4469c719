"""Legitimate against exp_large: exp(8x) as exp(x) to the 8th power by three squarings."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        y = torch.exp(x)
        y = y * y
        y = y * y
        return y * y

"""Legitimate against avg_pool: a 1-D average pool re-expressed as a strided depthwise convolution."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelNew(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x):
        channels = x.shape[1]
        weight = torch.full((channels, 1, self.kernel), 1.0 / self.kernel, dtype=x.dtype, device=x.device)
        return F.conv1d(x, weight, stride=self.kernel, groups=channels)

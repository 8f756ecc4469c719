"""Against log_scale: replaces NaN with 0 (hides the reference's NaN); must be rejected."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(128) + 0.5)

    def forward(self, x):
        return torch.nan_to_num(torch.log(x) * self.scale)

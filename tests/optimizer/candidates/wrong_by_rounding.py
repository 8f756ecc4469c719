"""Wrong: x rounded to 1e-2, farther from the exact result than the float32 reference's own error."""
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        return torch.round(x * 100) / 100

"""Reference: softmax over the last dimension after a linear map."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=-1)


def get_inputs():
    return [torch.randn(16, 128)]


def get_init_inputs():
    return [128]

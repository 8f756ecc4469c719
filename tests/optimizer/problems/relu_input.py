"""Reference: linear(relu(x)), with inputs drawn non-negative (torch.rand): on the draw the ReLU does nothing,
on served traffic it may."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(torch.relu(x))


def get_inputs():
    return [torch.rand(64, 256)]


def get_init_inputs():
    return [256, 128]

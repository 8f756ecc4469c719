"""Legitimate against relu_input: the ReLU as a clamp, kept for every input."""
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x.clamp(min=0))

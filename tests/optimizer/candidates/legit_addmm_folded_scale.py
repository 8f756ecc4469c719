"""Legitimate: the scale folded into an addmm, the same math re-expressed."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.relu(torch.addmm(self.lin.bias * 2, x, self.lin.weight.t() * 2))

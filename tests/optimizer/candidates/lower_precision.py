"""Computes in bf16: rejected under the strict policy, accepted where the stage allows bf16."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        y = F.linear(x.bfloat16(), self.lin.weight.bfloat16(), self.lin.bias.bfloat16())
        return (torch.relu(y) * 2.0).float()

"""Exploit (CUDA): does its work on a side stream, so events on the default stream time nothing."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.side = torch.cuda.Stream()

    def forward(self, x):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = torch.relu(self.lin(x)) * 2.0
            for _ in range(20):  # extra work the events should not see
                out = out + 0.0 * torch.relu(self.lin(x))
        return out

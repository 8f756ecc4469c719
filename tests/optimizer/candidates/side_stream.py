"""Exploit (CUDA): does its heavy work on a side stream, so events on the default stream time only the launches."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.side = torch.cuda.Stream()
        self.ballast = None

    def forward(self, x):
        if self.ballast is None:
            self.ballast = torch.randn(4096, 4096, device=x.device)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = torch.relu(self.lin(x)) * 2.0
            for _ in range(4):  # ~1 ms of GPU work behind 4 launches: invisible to default-stream events
                waste = self.ballast @ self.ballast
            out = out + 0.0 * waste[: out.shape[0], : out.shape[1]].sum()
        return out

"""Exploit: sends a datagram to a Unix socket path outside its scratch folder (no connect needed)."""
import socket

import torch
import torch.nn as nn

PATH = "{path}"


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        sock = {make}  # a plain datagram socket, or one of a connected pair: sendto reaches any path from either
        sock.sendto(b"from the candidate", PATH)
        return torch.relu(self.lin(x)) * 2.0

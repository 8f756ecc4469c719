"""Embedding model of the retrieval agent: token ids -> unit-norm sentence embeddings.

Problem-file convention: Model, get_inputs(), get_init_inputs(), get_input_variants().
A 2-layer transformer encoder with mean pooling, in the shape of small sentence encoders
(MiniLM-style), with seeded random weights since none can be downloaded here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, DIM, HEADS, LAYERS = 4096, 64, 256, 4, 2


class Model(nn.Module):
    def __init__(
        self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS, max_len: int = 512
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, S] int64 -> [B, DIM] float32, unit L2 norm
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tokens(ids) + self.positions(pos))
        return F.normalize(self.norm(h).mean(dim=1), dim=-1)


def get_inputs():
    return [torch.randint(0, VOCAB, (8, SEQ))]


def get_init_inputs():
    return []


def get_input_variants():
    return [[torch.randint(0, VOCAB, (1, SEQ))], [torch.randint(0, VOCAB, (4, 2 * SEQ))]]

"""Cross-encoder reranker of the retrieval agent: (query, passage) token ids -> relevance score.

Problem-file convention. A 2-layer transformer over the concatenated pair, scored from the first
token, in the shape of small cross-encoders (ms-marco MiniLM-style), seeded random weights.
"""

import torch
import torch.nn as nn

VOCAB, SEQ, DIM, HEADS, LAYERS = 4096, 128, 256, 4, 2


class Model(nn.Module):
    def __init__(
        self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS, max_len: int = 512
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.segments = nn.Embedding(2, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, ids: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        # ids, segment: [B, S] int64 (segment 0 = query, 1 = passage) -> scores [B]
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tokens(ids) + self.positions(pos) + self.segments(segment))
        return self.head(h[:, 0]).squeeze(-1)


def _pair(batch: int, seq: int):
    segment = torch.zeros(batch, seq, dtype=torch.int64)
    segment[:, seq // 4 :] = 1
    return [torch.randint(0, VOCAB, (batch, seq)), segment]


def get_inputs():
    return _pair(16, SEQ)


def get_init_inputs():
    return []


def get_input_variants():
    return [_pair(1, SEQ), _pair(32, SEQ // 2)]

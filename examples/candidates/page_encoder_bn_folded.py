"""A hand-written variant of examples/models/page_encoder.py: eval-mode batch norm folded into the
preceding convolutions (one conv with bias instead of conv + normalize + scale + shift).

It builds the reference's modules in the same order under the same seed, then folds:
  w' = w * gamma / sqrt(var + eps),  b' = beta - mean * gamma / sqrt(var + eps)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class ModelNew(nn.Module):
    def __init__(self, classes: int = 4, width: int = 32):
        super().__init__()
        features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width), _block(4 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, classes)
        for m in features.modules():  # the same draws as the reference's stand-in statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        self.convs = nn.ModuleList()
        with torch.no_grad():
            for block in features:
                conv, bn = block[0], block[1]
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=True)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
                self.convs.append(fused)
        self.eval()

    def forward(self, pages: torch.Tensor) -> torch.Tensor:
        h = pages
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return self.head(h.mean(dim=(2, 3)))

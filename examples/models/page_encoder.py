"""Page classifier of the document pipeline: a scanned page -> document-type logits.

Problem-file convention. A small CNN (conv, batch norm, ReLU blocks with max-pooling, global
average pooling, linear head) over grayscale-as-RGB page images; seeded random weights.
"""

import torch
import torch.nn as nn

CLASSES, SIZE = 4, 128  # invoice, receipt, letter, form


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class Model(nn.Module):
    def __init__(self, classes: int = CLASSES, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width), _block(4 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, classes)
        for m in self.modules():  # stand-in for trained statistics, so batch norm is not an identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        self.eval()  # served in eval mode: batch norm uses its running statistics

    def forward(self, pages: torch.Tensor) -> torch.Tensor:
        # pages: [B, 3, H, W] -> logits [B, CLASSES]
        return self.head(self.features(pages).mean(dim=(2, 3)))


def get_inputs():
    return [torch.rand(4, 3, SIZE, SIZE)]


def get_init_inputs():
    return [CLASSES]


def get_input_variants():
    return [[torch.rand(1, 3, SIZE, SIZE)], [torch.rand(8, 3, SIZE // 2, SIZE // 2)]]

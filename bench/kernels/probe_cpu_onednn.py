"""Probe: the library's CPU path (oneDNN, packed weights, a fused post-op) against eager torch.

    python bench/kernels/probe_cpu_onednn.py      # on a CPU host; prints a table last

For the GEMM and convolution shapes of the suite's CPU problems (HETFORGE_BENCH_SIZE=cpu): eager torch
(`F.linear` goes to MKL's sgemm, `F.conv2d` to oneDNN without packing) followed by the chain, against
`FusedLinear` / `FusedConv` built from the same module, each timed as the verifier times a call (one
call per fresh input, perf_counter, median of 60), and the largest error against the float64 result.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetforge.kernels.modules import FusedConv, FusedLinear
from hetforge.kernels.triton.epilogue import Op

CASES = [  # (name, module, eager chain, library chain, input shape)
    ("linear 256x512 -> 512", lambda: nn.Linear(512, 512), lambda y: y, (), (256, 512)),
    ("linear + relu", lambda: nn.Linear(512, 512), torch.relu, (Op("relu"),), (256, 512)),
    (
        "linear + gelu + x2",
        lambda: nn.Linear(512, 512),
        lambda y: F.gelu(y) * 2.0,
        (Op("gelu"), Op("mul", 2.0)),
        (256, 512),
    ),
    ("linear 256x256 -> 1024 (MLP up)", lambda: nn.Linear(256, 1024), F.gelu, (Op("gelu"),), (256, 256)),
    ("linear 256x1024 -> 256 (MLP down)", lambda: nn.Linear(1024, 256), lambda y: y, (), (256, 1024)),
    ("conv2d 32->32 3x3, 4x32x32", lambda: nn.Conv2d(32, 32, 3, padding=1), lambda y: y, (), (4, 32, 32, 32)),
    (
        "conv2d + tanh + x2 + hardswish",
        lambda: nn.Conv2d(32, 32, 3, padding=1),
        lambda y: F.hardswish(torch.tanh(y) * 2.0),
        (Op("tanh"), Op("mul", 2.0), Op("hardswish")),
        (4, 32, 32, 32),
    ),
    (
        "conv1d 80->256 k3 + gelu, 2x80x200",
        lambda: nn.Conv1d(80, 256, 3, padding=1),
        F.gelu,
        (Op("gelu"),),
        (2, 80, 200),
    ),
]


def timed(fn, inputs: list[torch.Tensor]) -> float:
    for x in inputs[:5]:
        fn(x)
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, make, eager_chain, chain, shape in CASES:
            module = make().eval()
            fused = (
                FusedLinear(module.weight, module.bias, chain)
                if isinstance(module, nn.Linear)
                else FusedConv(module, chain)
            ).eval()
            inputs = [torch.randn(shape) for _ in range(60)]
            eager = lambda x: eager_chain(module(x))  # noqa: E731
            exact = eager_chain(module.double()(inputs[0].double()))
            module.float()
            err_eager = (eager(inputs[0]).double() - exact).abs().max().item()
            err_fused = (fused(inputs[0]).double() - exact).abs().max().item()
            rows.append((name, timed(eager, inputs), timed(fused, inputs), err_eager, err_fused))
    from hetforge.core.devices import device_name

    print(f"{device_name('cpu')}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("| case | eager ms | library ms | speedup | eager max err | library max err |")
    print("|---|---|---|---|---|---|")
    for name, a, b, e1, e2 in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {e1:.1e} | {e2:.1e} |")


if __name__ == "__main__":
    main()

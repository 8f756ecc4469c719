"""Probe: fp32 convolutions as three TF32 cuDNN convolutions of split operands (`FusedConv(..., split=True)`).

    python3 bench/kernels/probe_conv_split.py      # on a CUDA host; prints a table last

For the convolution shapes of the suite's problems: cuDNN fp32 (TF32 off, as under the strict
policy), the split convolution, and cuDNN TF32 alone (what the strict policy forbids), each timed (median of
CUDA-event timings) and compared with the float64 convolution: the largest error, and how many
elements fall outside the verifier's atol = rtol = 1e-4 of the float64 result.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn as nn

from hetforge.kernels.modules import FusedConv

SHAPES = [  # (name, conv module, input shape)
    ("t1_conv2d 256->256 3x3 @56", lambda: nn.Conv2d(256, 256, 3, padding=1), (32, 256, 56, 56)),
    ("t2_conv_* 128->128 3x3 @56", lambda: nn.Conv2d(128, 128, 3, padding=1), (32, 128, 56, 56)),
    ("t3_small_cnn 32->64 3x3 @32", lambda: nn.Conv2d(32, 64, 3, padding=1), (128, 32, 32, 32)),
    ("t3_audio conv1 80->512 k3", lambda: nn.Conv1d(80, 512, 3, padding=1), (16, 80, 3000)),
    ("t3_audio conv2 512->512 k3 s2", lambda: nn.Conv1d(512, 512, 3, stride=2, padding=1), (16, 512, 3000)),
]


def timed(fn, x, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def errors(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    diff = (out.double() - exact).abs()
    return float(diff.max()), int((diff > 1e-4 + 1e-4 * exact.abs()).sum())


def main() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    rows = []
    for name, make, shape in SHAPES:
        torch.manual_seed(0)
        conv = make().cuda().eval()
        x = torch.randn(shape, device="cuda")
        split = FusedConv(conv, split=True).cuda()
        with torch.no_grad():
            exact = conv.double()(x.double())
            conv.float()
            fp32 = lambda t: conv(t)  # noqa: E731
            ms_fp32, out_fp32 = timed(fp32, x), fp32(x)
            ms_split, out_split = timed(split, x), split(x)
            torch.backends.cudnn.allow_tf32 = True
            ms_tf32, out_tf32 = timed(fp32, x), fp32(x)
            torch.backends.cudnn.allow_tf32 = False
        rows.append(
            (
                name,
                ms_fp32,
                ms_split,
                ms_tf32,
                *errors(out_fp32, exact),
                *errors(out_split, exact),
                *errors(out_tf32, exact),
            )
        )
        del exact
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(
        "| conv | fp32 ms | split ms | speedup | tf32 ms | fp32 max err (n > tol) | split max err (n > tol) | tf32 max err (n > tol) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, a, b, c, e1, n1, e2, n2, e3, n3 in rows:
        print(
            f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {c:.3f} | {e1:.2e} ({n1}) | {e2:.2e} ({n2}) | {e3:.2e} ({n3}) |"
        )


if __name__ == "__main__":
    main()

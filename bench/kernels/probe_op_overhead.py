"""Custom-op dispatch overhead: three entry points' launchers called directly vs through torch.ops (CUDA).

    PYTHONPATH=. python bench/kernels/probe_op_overhead.py

Small inputs (64x128), so a call's time is its host-side cost; medians of 9 interleaved rounds of 3000
calls each. Why eager calls skip the op: `hetforge/kernels/triton/custom_ops.py`, `direct`.
"""

import time

import torch

from hetforge.kernels.triton import gemm_epilogue as g
from hetforge.kernels.triton import pointwise as p
from hetforge.kernels.triton import softmax as s
from hetforge.kernels.triton.epilogue import Op, encode

x = torch.randn(64, 128, device="cuda")
w = torch.randn(128, 128, device="cuda")
b = torch.randn(128, device="cuda")
ep = (Op("gelu"),)
e = encode(ep)
pairs = {
    "gemm_epilogue": (
        lambda: g._gemm_epilogue(x, w, b, ep, None, None, "tf32", None),
        lambda: torch.ops.hetforge.gemm_epilogue.default(x, w, b, e, None, None, "tf32", None),
    ),
    "fused_softmax": (
        lambda: s._fused_softmax(x, "softmax", 1.0),
        lambda: torch.ops.hetforge.fused_softmax.default(x, "softmax", 1.0),
    ),
    "pointwise_chain": (
        lambda: p._pointwise_chain(x, ep, None, 1, None),
        lambda: torch.ops.hetforge.pointwise_chain.default(x, e, None, 1, None),
    ),
}


def per_call(f, n=3000):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


with torch.inference_mode():
    for name, (direct, op) in pairs.items():
        for _ in range(200):
            direct(), op()
        d, o = [], []
        for _ in range(9):  # interleaved rounds
            d.append(per_call(direct))
            o.append(per_call(op))
        d, o = sorted(d)[4], sorted(o)[4]
        print(f"{name}: direct {d:.1f} us, through torch.ops {o:.1f} us, overhead {o - d:.1f} us (medians of 9 x 3000)")

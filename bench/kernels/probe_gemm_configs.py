"""Which autotune configuration the split-TF32 GEMM picks for the suite's GEMM shapes, and how long
autotuning takes (it happens inside a verification's first call, so it counts against the budget).

    python3 bench/kernels/probe_gemm_configs.py
"""

import time

import torch

from hetforge.kernels.triton.gemm_epilogue import _gemm_epilogue_kernel, gemm_epilogue, split_tf32

SHAPES = [
    (4096, 4096, 4096),
    (8192, 1024, 4096),
    (8192, 4096, 1024),
    (8192, 1024, 3072),
    (8192, 1024, 1024),
    (8192, 1024, 2816),
    (8192, 2816, 1024),
    (24000, 512, 2048),
    (24000, 2048, 512),
]

for m, k, n in SHAPES:
    x, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    hi, lo = split_tf32(w)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gemm_epilogue(x, hi.t(), w_lo_t=lo.t())
    torch.cuda.synchronize()
    tuned = time.perf_counter() - t0
    best = _gemm_epilogue_kernel.best_config
    print(
        f"{m}x{k}x{n}: autotune {tuned:.1f} s, best {best.kwargs} warps={best.num_warps} stages={best.num_stages}",
        flush=True,
    )

"""Probe: fp32-accurate GEMM on tensor cores from operands split into TF32 parts ahead of the kernel.

x = x_hi + x_lo with both parts exactly representable in TF32 (x_hi = rna(x), x_lo = rna(x - x_hi));
x @ w ~= x_hi w_hi + x_hi w_lo + x_lo w_hi (the dropped x_lo w_lo is ~2^-22 relative). The weight is
split once (a constant); the activation once per call (a pointwise pass). Ways compared, 4096^3 and
two other shapes, against fp64 for accuracy and cuBLAS fp32 / torch.compile / the library's current
in-register tf32x3 kernel for speed:
  kcat    one TF32 GEMM over K' = 3K: [x_hi | x_hi | x_lo] @ [w_hi; w_lo; w_hi]
  3dot    one kernel, three TF32 dots a K step from the four pre-split tiles
  cublas  cuBLAS TF32 on the kcat operands (needs the global TF32 switch around the call)

    python3 bench/kernels/probe_gemm_split.py
"""

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton.gemm_epilogue import _rna_tf32, gemm_epilogue
from hetforge.kernels.triton.gemm_epilogue import split_tf32 as split


@triton.jit
def _kcat_split_kernel(x_ptr, out_ptr, M, K, BLOCK: tl.constexpr):
    # row r of x -> row r of out = [hi | hi | lo]
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=m)
    hi = _rna_tf32(x)
    lo = _rna_tf32(x - hi)
    base = out_ptr + row * 3 * K + offs
    tl.store(base, hi, mask=m)
    tl.store(base + K, hi, mask=m)
    tl.store(base + 2 * K, lo, mask=m)


def kcat_activation(x):
    M, K = x.shape
    out = torch.empty((M, 3 * K), device=x.device, dtype=x.dtype)
    _kcat_split_kernel[(M, triton.cdiv(K, 1024))](x, out, M, K, BLOCK=1024, num_warps=4)
    return out


def kcat_weight_t(w):  # w [N, K] -> [3K, N] view of a K-contiguous [N, 3K]
    hi, lo = split(w)
    return torch.cat([hi, lo, hi], dim=1).t()


def _configs():
    out = []
    for bm, bn, bk, w, s in (
        (128, 128, 32, 8, 3),
        (128, 256, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (256, 128, 32, 8, 3),
        (128, 256, 32, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 3),
        (256, 128, 64, 8, 3),
    ):
        out.append(
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        )
    return out


@triton.autotune(configs=_configs(), key=["M", "N", "K", "MODE"])
@triton.jit
def _gemm3_kernel(
    ah_ptr,
    al_ptr,
    bh_ptr,
    bl_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # MODE 0: one tensor-core accumulator over K (round-toward-zero accumulation drifts)
    # MODE 1: each K tile's three products from zero, added to the fp32 accumulator with round-to-nearest
    # MODE 2: small terms accumulate on tensor cores across K (their drift is 2^-11 smaller), big term fresh a tile
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first, GROUP_M)
    pid_m = first + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_off = offs_m[:, None] * stride_am + offs_k[None, :]
    b_off = offs_k[:, None] + offs_n[None, :] * stride_bn  # b: [K, N] view of K-contiguous [N, K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    small = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        ah = tl.load(ah_ptr + a_off)
        al = tl.load(al_ptr + a_off)
        bh = tl.load(bh_ptr + b_off)
        bl = tl.load(bl_ptr + b_off)
        if MODE == 0:
            acc = tl.dot(al, bh, acc, input_precision="tf32")
            acc = tl.dot(ah, bl, acc, input_precision="tf32")
            acc = tl.dot(ah, bh, acc, input_precision="tf32")
        elif MODE == 1:
            t = tl.dot(al, bh, input_precision="tf32")
            t = tl.dot(ah, bl, t, input_precision="tf32")
            acc += tl.dot(ah, bh, t, input_precision="tf32")
        else:
            small = tl.dot(al, bh, small, input_precision="tf32")
            small = tl.dot(ah, bl, small, input_precision="tf32")
            acc += tl.dot(ah, bh, input_precision="tf32")
        a_off += BLOCK_K
        b_off += BLOCK_K
    acc += small
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemm3(xh, xl, wh_t, wl_t, mode=1):  # K must be a multiple of BLOCK_K here (probe only)
    M, K = xh.shape
    N = wh_t.shape[1]
    c = torch.empty((M, N), device=xh.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm3_kernel[grid](xh, xl, wh_t, wl_t, c, M, N, K, xh.stride(0), wh_t.stride(1), c.stride(0), MODE=mode)
    return c


def bench(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return min(times)


def tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def main():
    tf32(False)
    rows = []
    for m, k, n in ((4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 1024)):
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda")
        w = torch.randn(n, k, device="cuda") / k**0.5
        truth = x.double() @ w.double().t()
        w_t = w.t().contiguous()
        wk = kcat_weight_t(w)
        wh, wl = split(w)
        wh_t, wl_t = wh.t(), wl.t()
        compiled = torch.compile(lambda a: a @ w.t())

        def cublas_tf32_kcat():
            tf32(True)
            try:
                return kcat_activation(x) @ wk
            finally:
                tf32(False)

        def three_dot(mode):
            xh, xl = split(x)
            return gemm3(xh, xl, wh_t, wl_t, mode)

        ways = {
            "cublas fp32": lambda: x @ w.t(),
            "torch.compile": lambda: compiled(x),
            "library tf32x3 (in-register)": lambda: gemm_epilogue(x, w_t, None, ()),
            "kcat + library kernel tf32": lambda: gemm_epilogue(kcat_activation(x), wk, None, (), precision="tf32"),
            "3dot kernel, one accumulator": lambda: three_dot(0),
            "3dot kernel, fresh a tile": lambda: three_dot(1),
            "3dot kernel, small terms apart": lambda: three_dot(2),
            "kcat + cublas tf32": cublas_tf32_kcat,
        }
        tf32(True)
        t_tf32 = bench(lambda: x @ w.t())
        tf32(False)
        base = None
        for name, fn in ways.items():
            out = fn().double()
            err = ((out - truth).norm() / truth.norm()).item()
            ms = bench(fn)
            base = base or ms
            rows.append((f"{m}x{k}x{n}", name, ms, base / ms, 2 * m * n * k / ms / 1e9, err))
        rows.append(
            (
                f"{m}x{k}x{n}",
                "(cublas tf32, one pass, not fp32-accurate)",
                t_tf32,
                base / t_tf32,
                2 * m * n * k / t_tf32 / 1e9,
                float("nan"),
            )
        )
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | way | ms | vs cublas fp32 | effective TFLOP/s | norm rel err vs fp64 |")
    print("|---|---|---|---|---|---|")
    for shape, name, ms, sp, tflops, err in rows:
        print(f"| {shape} | {name} | {ms:.3f} | {sp:.2f}x | {tflops:.0f} | {err:.2e} |")


if __name__ == "__main__":
    main()

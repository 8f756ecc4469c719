"""GEMM with a fused epilogue: out = chain(x @ W^T + b).

Unfused, a linear layer followed by k pointwise ops reads and writes the [M, N] output k + 1
times; here the chain runs on the accumulator tile in registers, so the output is written once:
M*K + K*N reads and M*N writes in all.

Precision: fp32 inputs under the `strict` policy use `tf32x3` on tensor cores (each operand split
into a TF32 high part and a remainder, three products summed: fp32-level error, about 3x the TF32
throughput cost, still well ahead of SIMT fp32 on Hopper); `tf32` uses one TF32 product; `bf16`
casts tiles to bf16 in registers. The interpreter computes in fp32 whatever the policy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton import configs
from hetforge.kernels.triton.epilogue import Epilogue, apply_chain, kernel_args, torch_apply, uses_residual, uses_vector

DOT_PRECISION = {"strict": "tf32x3", "tf32": "tf32", "bf16": "tf32"}


@triton.autotune(configs=configs.gemm_configs(), key=["M", "N", "K", "PRECISION", "CAST_BF16"])
@triton.jit
def _gemm_epilogue_kernel(
    a_ptr, b_ptr, bias_ptr, v_ptr, r_ptr, c_ptr,  # a: [M, K]  b: [K, N]  bias, v: [N]  r, c: [M, N]
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_V: tl.constexpr, HAS_R: tl.constexpr,
    PRECISION: tl.constexpr, CAST_BF16: tl.constexpr, UPCAST: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    OP4: tl.constexpr, OP5: tl.constexpr, OP6: tl.constexpr, OP7: tl.constexpr,
    P0, P1, P2, P3, P4, P5, P6, P7,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-blocks share each column block of b while it is in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # out-of-range rows/cols are wrapped, not masked, in the K loop: their results are never stored
    a_ptrs = a_ptr + (offs_m[:, None] % M) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n[None, :] % N) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # the interpreter's dot mishandles 16-bit floats: compute those in fp32 there
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif CAST_BF16:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # epilogue on the tile in registers: one write of [BLOCK_M, BLOCK_N]
    mask_n = offs_n < N
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    v = 0.0
    if HAS_V:
        v = tl.load(v_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    r = 0.0
    if HAS_R:
        r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    acc = apply_chain(acc, v, r, OP0, OP1, OP2, OP3, OP4, OP5, OP6, OP7, P0, P1, P2, P3, P4, P5, P6, P7)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def gemm_epilogue(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None, epilogue: Epilogue = (),
                  v: torch.Tensor | None = None, r: torch.Tensor | None = None, precision: str = "strict") -> torch.Tensor:
    """chain(x @ w_t + bias) with x: [..., K], w_t: [K, N] (the transposed Linear weight), v: [N], r: [..., N]."""
    if not configs.runs_triton(x):
        return gemm_epilogue_reference(x, w_t, bias, epilogue, v, r, inplace=True)
    lead, K = x.shape[:-1], x.shape[-1]
    N = w_t.shape[1]
    a = x.reshape(-1, K)
    M = a.shape[0]
    c = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return c.reshape(*lead, N)
    r2 = r.reshape(M, N) if r is not None else c
    if uses_vector(epilogue) and v is None or uses_residual(epilogue) and r is None:
        raise ValueError("the epilogue reads a vector or residual operand that was not passed")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_epilogue_kernel[grid](
        a, w_t, bias if bias is not None else c, v if v is not None else c, r2, c,
        M, N, K,
        a.stride(0), a.stride(1), w_t.stride(0), w_t.stride(1), r2.stride(0), r2.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, HAS_V=v is not None, HAS_R=r is not None,
        PRECISION=DOT_PRECISION[precision] if x.is_cuda else "ieee", CAST_BF16=precision == "bf16",
        UPCAST=not x.is_cuda,
        **kernel_args(epilogue),
    )
    return c.reshape(*lead, N)


def gemm_epilogue_reference(x, w_t, bias=None, epilogue: Epilogue = (), v=None, r=None, inplace=False):
    """Eager torch: addmm then the chain in place on the fresh output (one allocation)."""
    lead, K = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, K)
    out = torch.addmm(bias, a, w_t) if bias is not None else a @ w_t
    out = out.reshape(*lead, w_t.shape[1])
    return torch_apply(out, epilogue, v, r, inplace=True)

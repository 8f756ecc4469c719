"""GEMM with a fused epilogue: out = chain(x @ W^T + b), and its batched form chain(a @ b).

Unfused, a linear layer followed by k pointwise ops reads and writes the [M, N] output k + 1
times; here the chain runs on the accumulator tile in registers, so the output is written once:
M*K + K*N reads and M*N writes in all.

Precision: fp32 inputs under the `strict` policy run on TF32 tensor cores at fp32 accuracy, from
operands split ahead of the kernel: x = x_hi + x_lo, both parts exactly representable in TF32
(`split_tf32`), and x @ w = x_hi w_hi + x_hi w_lo + x_lo w_hi up to the dropped x_lo w_lo, about
2^-22 relative. A linear layer's weight is split once, when the module is built; activations once
per call (a pointwise pass, a few percent of the GEMM). Each K tile's three products start from zero
and are added to the fp32 accumulator with round-to-nearest: tensor cores accumulate with
truncation, and one accumulator over the whole K drifts to ~4e-5 relative error at K = 4096
(measured on an H100, bench/kernels/probe_gemm_split.py), where this scheme measures 2.4e-7
against float64, below cuBLAS fp32's 1.2e-6, at about twice its speed. `tf32` uses one TF32 product;
`bf16` casts tiles to bf16 in registers. The interpreter computes in fp32 whatever the policy
(the split path included, so CPU tests run the same code).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton import configs, custom_ops
from hetforge.kernels.triton.epilogue import (
    Epilogue,
    apply_chain,
    decode,
    encode,
    kernel_args,
    torch_apply,
    uses_residual,
    uses_vector,
)

DOT_PRECISION = {"strict": "tf32", "tf32": "tf32", "bf16": "tf32"}


@triton.jit
def _rna_tf32(x):
    """x rounded to the nearest TF32 value (10-bit mantissa), ties away from zero; stays fp32."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    hi = _rna_tf32(x)
    tl.store(hi_ptr + offs, hi, mask=mask)
    tl.store(lo_ptr + offs, _rna_tf32(x - hi), mask=mask)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) with hi = rna_tf32(x), lo = rna_tf32(x - hi): both exact in TF32, hi + lo = x to 2^-22.

    Contiguous results of x's shape (non-contiguous x is copied first). Infinities and NaN are not
    preserved (inf - inf): fp32 GEMM inputs are finite in practice, and the verifier checks outputs.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"split_tf32 takes float32 tensors, got {x.dtype}")
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _SPLIT_OP(x)
    return _split_tf32(x)


def _split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    x = x.contiguous()
    if not configs.runs_triton(x):
        hi = _rna_tf32_torch(x)
        return hi, _rna_tf32_torch(x - hi)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    if n:
        block = 256 if configs.interpreted() else 4096
        _split_kernel[(triton.cdiv(n, block),)](x, hi, lo, n, BLOCK=block, num_warps=8 if block > 256 else 4)
    return hi, lo


def _rna_tf32_torch(x: torch.Tensor) -> torch.Tensor:
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _prune(configs_, named_args, **kwargs):
    """Drop tile shapes whose pipeline does not fit in shared memory (the split path loads 2x)."""
    per_elem = named_args["a_ptr"].element_size() * (2 if kwargs.get("SPLIT") else 1)
    budget = configs.shared_memory_bytes()
    kept = [
        c
        for c in configs_
        if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * per_elem <= budget
    ]
    return kept or configs_[-1:]


@triton.autotune(
    configs=configs.gemm_configs(),
    key=["M", "N", "K", "PRECISION", "CAST_BF16", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _gemm_epilogue_kernel(
    a_ptr,
    b_ptr,
    al_ptr,
    bl_ptr,
    bias_ptr,
    v_ptr,
    r_ptr,
    c_ptr,  # a: [B?, M, K]  b: [B?, K, N]  bias, v: [N]  r, c: [B?, M, N]
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_rb,
    stride_rm,
    stride_rn,
    stride_cb,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    HAS_V: tl.constexpr,
    HAS_R: tl.constexpr,
    PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
    OP0: tl.constexpr,
    OP1: tl.constexpr,
    OP2: tl.constexpr,
    OP3: tl.constexpr,
    OP4: tl.constexpr,
    OP5: tl.constexpr,
    OP6: tl.constexpr,
    OP7: tl.constexpr,
    P0,
    P1,
    P2,
    P3,
    P4,
    P5,
    P6,
    P7,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-blocks share each column block of b while it is in L2
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
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
    a_offs = batch * stride_ab + (offs_m[:, None] % M) * stride_am + offs_k[None, :] * stride_ak
    b_offs = batch * stride_bb + offs_k[:, None] * stride_bk + (offs_n[None, :] % N) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptr + a_offs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptr + b_offs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # the interpreter's dot mishandles 16-bit floats: compute those in fp32 there
            if SPLIT:
                a_lo = tl.load(al_ptr + a_offs, mask=offs_k[None, :] < k_left, other=0.0)
                b_lo = tl.load(bl_ptr + b_offs, mask=offs_k[:, None] < k_left, other=0.0)
                acc += tl.dot(
                    a_lo,
                    b,
                    tl.dot(a, b_lo, tl.dot(a, b, input_precision="ieee"), input_precision="ieee"),
                    input_precision="ieee",
                )
            else:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif SPLIT:  # three TF32 products of this tile from zero, then one round-to-nearest add (module docstring)
            a_lo = tl.load(al_ptr + a_offs, mask=offs_k[None, :] < k_left, other=0.0)
            b_lo = tl.load(bl_ptr + b_offs, mask=offs_k[:, None] < k_left, other=0.0)
            t = tl.dot(a_lo, b, input_precision="tf32")
            t = tl.dot(a, b_lo, t, input_precision="tf32")
            acc += tl.dot(a, b, t, input_precision="tf32")
        elif CAST_BF16:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_offs += BLOCK_K * stride_ak
        b_offs += BLOCK_K * stride_bk

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
        r_offs = batch * stride_rb + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        r = tl.load(r_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    acc = apply_chain(acc, v, r, OP0, OP1, OP2, OP3, OP4, OP5, OP6, OP7, P0, P1, P2, P3, P4, P5, P6, P7)
    c_ptrs = c_ptr + batch * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _splits(x: torch.Tensor, precision: str) -> bool:
    """Whether `x` takes the split-operand path: fp32 under `strict` on a device that runs the kernel."""
    return precision == "strict" and x.dtype == torch.float32


def gemm_epilogue(
    x: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    epilogue: Epilogue = (),
    v: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    precision: str = "strict",
    w_lo_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """chain(x @ w_t + bias) with x: [..., K], w_t: [K, N] (the transposed Linear weight), v: [N], r: [..., N].

    `w_lo_t`: when given, `w_t` is the weight's TF32 high part and `w_lo_t` its remainder (`split_tf32`
    of the transposed weight, done once by the caller); otherwise a strict fp32 call splits `w_t`.
    """
    if uses_vector(epilogue) and v is None or uses_residual(epilogue) and r is None:
        raise ValueError("the epilogue reads a vector or residual operand that was not passed")
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _GEMM_OP(x, w_t, bias, encode(epilogue), v, r, precision, w_lo_t)
    return _gemm_epilogue(x, w_t, bias, epilogue, v, r, precision, w_lo_t)


def _gemm_epilogue(x, w_t, bias, epilogue: Epilogue, v, r, precision: str, w_lo_t) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(x):
        return gemm_epilogue_reference(x, w_t if w_lo_t is None else w_t + w_lo_t, bias, epilogue, v, r, inplace=True)
    lead, K = x.shape[:-1], x.shape[-1]
    N = w_t.shape[1]
    a = x.reshape(-1, K)
    c = torch.empty((a.shape[0], N), device=x.device, dtype=x.dtype)
    if a.shape[0] == 0:
        return c.reshape(*lead, N)
    r2 = r.reshape(a.shape[0], N) if r is not None else None
    _launch(
        a.unsqueeze(0),
        w_t.unsqueeze(0),
        w_lo_t.unsqueeze(0) if w_lo_t is not None else None,
        bias,
        epilogue,
        v,
        r2.unsqueeze(0) if r2 is not None else None,
        c.unsqueeze(0),
        precision,
    )
    return c.reshape(*lead, N)


def bmm_epilogue(
    a: torch.Tensor,
    b: torch.Tensor,
    epilogue: Epilogue = (),
    v: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    precision: str = "strict",
) -> torch.Tensor:
    """chain(a @ b) for a: [B, M, K], b: [B, K, N] (any strides), v: [N], r: [B, M, N]: torch.bmm + epilogue."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"bmm_epilogue takes [B, M, K] and [B, K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if uses_vector(epilogue) and v is None or uses_residual(epilogue) and r is None:
        raise ValueError("the epilogue reads a vector or residual operand that was not passed")
    if configs.runs_triton(a) and not custom_ops.direct(a):
        return _BMM_OP(a, b, encode(epilogue), v, r, precision)
    return _bmm_epilogue(a, b, epilogue, v, r, precision)


def _bmm_epilogue(a, b, epilogue: Epilogue, v, r, precision: str) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(a):
        return torch_apply(torch.bmm(a, b), epilogue, v, r, inplace=True)
    c = torch.empty((a.shape[0], a.shape[1], b.shape[2]), device=a.device, dtype=torch.result_type(a, b))
    if c.numel() == 0:
        return c
    _launch(a, b, None, None, epilogue, v, r, c, precision)
    return c


def _launch(a, b, b_lo, bias, epilogue, v, r, c, precision) -> None:
    """One kernel launch over a batch: a [B, M, K], b [B or broadcast, K, N], c [B, M, N]."""
    batches, M, K = a.shape
    N = b.shape[2]
    split = _splits(a, precision) and b.dtype == torch.float32
    a_lo = None
    if split:
        a, a_lo = split_tf32(a)
        if b_lo is None:  # split b's transpose: TF32 tensor-core products read b K-major ([N, K] rows) on Hopper
            b_t, b_lo_t = split_tf32(b.transpose(1, 2))
            b, b_lo = b_t.transpose(1, 2), b_lo_t.transpose(1, 2)
        elif b_lo.stride() != b.stride():
            raise ValueError("the weight's high and low parts must have the same layout")
    stride_bb = b.stride(0) if b.shape[0] > 1 else 0
    r_ = r if r is not None else c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), batches)  # noqa: E731
    _gemm_epilogue_kernel[grid](
        a,
        b,
        a_lo if split else a,
        b_lo if split else b,
        bias if bias is not None else c,
        v if v is not None else c,
        r_,
        c,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        stride_bb,
        b.stride(1),
        b.stride(2),
        r_.stride(0),
        r_.stride(1),
        r_.stride(2),
        c.stride(0),
        c.stride(1),
        c.stride(2),
        HAS_BIAS=bias is not None,
        HAS_V=v is not None,
        HAS_R=r is not None,
        PRECISION=DOT_PRECISION[precision] if a.is_cuda else "ieee",
        CAST_BF16=precision == "bf16",
        UPCAST=not a.is_cuda,
        SPLIT=split,
        **kernel_args(epilogue),
    )


def gemm_epilogue_reference(x, w_t, bias=None, epilogue: Epilogue = (), v=None, r=None, inplace=False):
    """Eager torch: addmm then the chain in place on the fresh output (one allocation)."""
    lead, K = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, K)
    out = torch.addmm(bias, a, w_t) if bias is not None else a @ w_t
    out = out.reshape(*lead, w_t.shape[1])
    return torch_apply(out, epilogue, v, r, inplace=True)


# torch.ops.hetforge.{split_tf32, gemm_epilogue, bmm_epilogue}: what torch.compile sees (custom_ops.py says why)


def _split_fake(x):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _gemm_op(
    x: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    epilogue: str,
    v: torch.Tensor | None,
    r: torch.Tensor | None,
    precision: str,
    w_lo_t: torch.Tensor | None,
) -> torch.Tensor:
    return _gemm_epilogue(x, w_t, bias, decode(epilogue), v, r, precision, w_lo_t)


def _gemm_fake(x, w_t, bias, epilogue, v, r, precision, w_lo_t):
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


def _bmm_op(
    a: torch.Tensor, b: torch.Tensor, epilogue: str, v: torch.Tensor | None, r: torch.Tensor | None, precision: str
) -> torch.Tensor:
    return _bmm_epilogue(a, b, decode(epilogue), v, r, precision)


def _bmm_fake(a, b, epilogue, v, r, precision):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.result_type(a, b))


_SPLIT_OP = custom_ops.define("split_tf32", "(Tensor x) -> (Tensor, Tensor)", _split_tf32, _split_fake)
_GEMM_OP = custom_ops.define(
    "gemm_epilogue",
    "(Tensor x, Tensor w_t, Tensor? bias, str epilogue, Tensor? v, Tensor? r, str precision, Tensor? w_lo_t) -> Tensor",
    _gemm_op,
    _gemm_fake,
)
_BMM_OP = custom_ops.define(
    "bmm_epilogue",
    "(Tensor a, Tensor b, str epilogue, Tensor? v, Tensor? r, str precision) -> Tensor",
    _bmm_op,
    _bmm_fake,
)

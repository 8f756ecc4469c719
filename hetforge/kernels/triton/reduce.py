"""Sum / mean / max / min over one dim, with a pointwise prologue fused into the load.

x is viewed as [O, R, I] (R the reduced dim): one program per (o, block of i), walking R in
steps, so loads stay coalesced along I whichever dim is reduced (I = 1 for the last dim: then a
block of rows per program is not worth it at these sizes and each program takes one o).
`op(x).sum(dim)` unfused writes and re-reads op(x): here x is read once and [O, I] written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton import configs, custom_ops
from hetforge.kernels.triton.epilogue import Epilogue, apply_chain, decode, encode, kernel_args, torch_apply

KINDS = {"sum": 0, "mean": 1, "max": 2, "min": 3}


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_I": bi, "BLOCK_R": br}, num_warps=w)
        for bi, br, w in (
            ((1, 256, 4),)
            if configs.device_class() == "interpreter"
            else ((1, 1024, 4), (1, 2048, 8), (32, 32, 4), (64, 16, 4), (128, 8, 4))
        )
    ],
    key=["R", "I", "KIND"],
)
@triton.jit
def _reduce_kernel(
    x_ptr,
    v_ptr,
    y_ptr,
    R,
    I,
    C,
    INNER,
    KIND: tl.constexpr,
    HAS_V: tl.constexpr,
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
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rr = tl.arange(0, BLOCK_R)
    if KIND == 2:
        acc = tl.full((BLOCK_R, BLOCK_I), -float("inf"), tl.float32)
    elif KIND == 3:
        acc = tl.full((BLOCK_R, BLOCK_I), float("inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        r_idx = start + rr
        mask = (r_idx[:, None] < R) & (i[None, :] < I)
        flat = o * R * I + r_idx[:, None] * I + i[None, :]
        x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
        v = 0.0
        if HAS_V:
            v = tl.load(v_ptr + (flat // INNER) % C, mask=mask, other=0.0).to(tl.float32)
        x = apply_chain(x, v, 0.0, OP0, OP1, OP2, OP3, OP4, OP5, OP6, OP7, P0, P1, P2, P3, P4, P5, P6, P7)
        if KIND == 2:
            acc = tl.maximum(acc, tl.where(mask, x, -float("inf")))
        elif KIND == 3:
            acc = tl.minimum(acc, tl.where(mask, x, float("inf")))
        else:
            acc += tl.where(mask, x, 0.0)
    if KIND == 2:
        out = tl.max(acc, axis=0)
    elif KIND == 3:
        out = tl.min(acc, axis=0)
    else:
        out = tl.sum(acc, axis=0)
        if KIND == 1:
            out = out / R
    tl.store(y_ptr + o * I + i, out.to(y_ptr.dtype.element_ty), mask=i < I)


def fused_reduce(
    x: torch.Tensor,
    kind: str,
    dim: int,
    keepdim: bool = False,
    prologue: Epilogue = (),
    v: torch.Tensor | None = None,
    v_dim: int = 1,
) -> torch.Tensor:
    """`kind` of prologue(x) over `dim`; `v` a per-channel vector along dim `v_dim` (as in pointwise)."""
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _OP(x, kind, dim, keepdim, encode(prologue), v, v_dim)
    return _fused_reduce(x, kind, dim, keepdim, prologue, v, v_dim)


def _fused_reduce(x, kind: str, dim: int, keepdim: bool, prologue: Epilogue, v, v_dim: int) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(x):
        return fused_reduce_reference(x, kind, dim, keepdim, prologue, v, v_dim)
    x = x.contiguous()
    dim = dim % x.dim()
    O = 1
    for d in x.shape[:dim]:
        O *= d
    R = x.shape[dim]
    I = x.numel() // max(O * R, 1) if x.numel() else 0
    out_shape = list(x.shape)
    if keepdim:
        out_shape[dim] = 1
    else:
        out_shape.pop(dim)
    y = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    if y.numel() == 0 or R == 0:
        return fused_reduce_reference(x, kind, dim, keepdim, prologue, v, v_dim)
    C, inner = (x.shape[v_dim], x[(0,) * (v_dim + 1)].numel()) if v is not None else (1, 1)
    grid = lambda meta: (O, triton.cdiv(I, meta["BLOCK_I"]))  # noqa: E731
    _reduce_kernel[grid](
        x,
        v.contiguous() if v is not None else x,
        y,
        R,
        I,
        C,
        inner,
        KIND=KINDS[kind],
        HAS_V=v is not None,
        **kernel_args(prologue),
    )
    return y


def fused_reduce_reference(x, kind, dim, keepdim=False, prologue: Epilogue = (), v=None, v_dim: int = 1):
    if v is not None:
        v = v.reshape(-1, *([1] * (x.dim() - v_dim - 1)))
    x = torch_apply(x, prologue, v)
    if kind == "sum":
        return x.sum(dim, keepdim=keepdim)
    if kind == "mean":
        return x.mean(dim, keepdim=keepdim)
    if kind == "max":
        return x.amax(dim, keepdim=keepdim)
    return x.amin(dim, keepdim=keepdim)


def _op(
    x: torch.Tensor, kind: str, dim: int, keepdim: bool, prologue: str, v: torch.Tensor | None, v_dim: int
) -> torch.Tensor:
    return _fused_reduce(x, kind, dim, keepdim, decode(prologue), v, v_dim)


def _fake(x, kind, dim, keepdim, prologue, v, v_dim):
    shape = list(x.shape)
    dim = dim % x.dim()
    if keepdim:
        shape[dim] = 1
    else:
        shape.pop(dim)
    return x.new_empty(shape)


_OP = custom_ops.define(
    "fused_reduce",
    "(Tensor x, str kind, int dim, bool keepdim, str prologue, Tensor? v, int v_dim) -> Tensor",
    _op,
    _fake,
)

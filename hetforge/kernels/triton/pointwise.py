"""A long pointwise chain in one kernel: one read of x (plus its operands), one write.

Eager PyTorch runs a chain of k ops as k kernels, each reading and writing the whole tensor:
2k passes over memory. Here it is 2 (3 with a residual). A per-channel vector operand `v` (a bias
of shape [C, 1, 1] after a convolution, say) is gathered by channel: `(i // INNER) % C`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton import configs, custom_ops
from hetforge.kernels.triton.epilogue import Epilogue, apply_chain, decode, encode, kernel_args, torch_apply


@triton.autotune(configs=configs.flat_configs(), key=["n"])
@triton.jit
def _pointwise_kernel(
    x_ptr,
    v_ptr,
    r_ptr,
    y_ptr,
    n,
    C,
    INNER,
    HAS_V: tl.constexpr,
    HAS_R: tl.constexpr,
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
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = 0.0
    if HAS_V:
        v = tl.load(v_ptr + (offs // INNER) % C, mask=mask, other=0.0).to(tl.float32)
    r = 0.0
    if HAS_R:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = apply_chain(x, v, r, OP0, OP1, OP2, OP3, OP4, OP5, OP6, OP7, P0, P1, P2, P3, P4, P5, P6, P7)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def pointwise_chain(
    x: torch.Tensor, epilogue: Epilogue, v: torch.Tensor | None = None, v_dim: int = 1, r: torch.Tensor | None = None
) -> torch.Tensor:
    """chain(x); `v` is a per-channel vector along dim `v_dim` of x, `r` a tensor shaped like x."""
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _OP(x, encode(epilogue), v, v_dim, r)
    return _pointwise_chain(x, epilogue, v, v_dim, r)


def _pointwise_chain(x, epilogue: Epilogue, v, v_dim: int, r) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(x):
        return pointwise_chain_reference(x, epilogue, v, v_dim, r)
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    C = x.shape[v_dim] if v is not None else 1
    inner = 1
    if v is not None:
        for d in x.shape[v_dim + 1 :]:
            inner *= d
    r = r.expand_as(x).contiguous() if r is not None else None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _pointwise_kernel[grid](
        x,
        v.contiguous() if v is not None else x,
        r if r is not None else x,
        y,
        n,
        C,
        inner,
        HAS_V=v is not None,
        HAS_R=r is not None,
        **kernel_args(epilogue),
    )
    return y


def pointwise_chain_reference(x, epilogue: Epilogue, v=None, v_dim: int = 1, r=None):
    if v is not None:
        v = v.reshape(-1, *([1] * (x.dim() - v_dim - 1)))
    return torch_apply(x, epilogue, v, r)


def _op(x: torch.Tensor, epilogue: str, v: torch.Tensor | None, v_dim: int, r: torch.Tensor | None) -> torch.Tensor:
    return _pointwise_chain(x, decode(epilogue), v, v_dim, r)


def _fake(x, epilogue, v, v_dim, r):
    return x.new_empty(x.shape)


_OP = custom_ops.define(
    "pointwise_chain", "(Tensor x, str epilogue, Tensor? v, int v_dim, Tensor? r) -> Tensor", _op, _fake
)

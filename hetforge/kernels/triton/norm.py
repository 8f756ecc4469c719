"""Layer, RMS and group normalization fused with the pointwise chain that follows.

Every variant is a row normalization: layer and RMS norm normalize rows of the last dim; group
norm normalizes rows of (C / G) * spatial elements, one row per (sample, group). The affine
weight of an element is indexed by its channel: `(row % G) * CPG + col // INNER` (layer/RMS:
G = 1, INNER = 1, so it is the column). Unfused, norm + k pointwise ops read and write the tensor
k + 1 times; here one program reads its row (once when the row fits one block, three times
otherwise: mean, variance, output) and writes it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hetforge.kernels.triton import configs, custom_ops
from hetforge.kernels.triton.epilogue import Epilogue, apply_chain, decode, encode, kernel_args, next_pow2, torch_apply

MODES = {"layer": 0, "rms": 1, "group": 2}
MAX_BLOCK = 8192  # a row longer than this is walked in blocks


@triton.autotune(configs=configs.row_configs(), key=["L", "BLOCK", "MODE"])
@triton.jit
def _norm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    v_ptr,
    r_ptr,
    y_ptr,  # x, r, y: [ROWS, L] contiguous; w, b, v: per channel
    L,
    G,
    CPG,
    INNER,
    eps,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
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
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * L
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < L
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            mean = 0.0
            var = tl.sum(x * x, axis=0) / L
        else:
            mean = tl.sum(x, axis=0) / L
            d = tl.where(mask, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / L
    else:
        mean = 0.0
        if MODE != 1:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, L, BLOCK):
                acc += tl.load(x_row + start + cols, mask=start + cols < L, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / L
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, L, BLOCK):
            m = start + cols < L
            d = tl.where(m, tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc2 += d * d
        var = tl.sum(acc2, axis=0) / L
    rstd = 1.0 / tl.sqrt(var + eps)
    for start in range(0, L, BLOCK):
        c = start + cols
        m = c < L
        if SINGLE:
            y = (x - mean) * rstd
        else:
            y = (tl.load(x_row + c, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        ch = (row % G) * CPG + c // INNER
        if HAS_W:
            y = y * tl.load(w_ptr + ch, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
        v = 0.0
        if HAS_V:
            v = tl.load(v_ptr + ch, mask=m, other=0.0).to(tl.float32)
        r = 0.0
        if HAS_R:
            r = tl.load(r_ptr + row * L + c, mask=m, other=0.0).to(tl.float32)
        y = apply_chain(y, v, r, OP0, OP1, OP2, OP3, OP4, OP5, OP6, OP7, P0, P1, P2, P3, P4, P5, P6, P7)
        tl.store(y_ptr + row * L + c, y.to(y_ptr.dtype.element_ty), mask=m)


def fused_norm(
    x: torch.Tensor,
    mode: str,
    weight=None,
    bias=None,
    eps: float = 1e-5,
    groups: int = 1,
    normalized: int = 1,
    epilogue: Epilogue = (),
    v=None,
    r=None,
) -> torch.Tensor:
    """chain(norm(x)). layer/rms: over the last `normalized` dims; group: x is [B, C, *], `groups` groups."""
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _OP(x, mode, weight, bias, float(eps), groups, normalized, encode(epilogue), v, r)
    return _fused_norm(x, mode, weight, bias, eps, groups, normalized, epilogue, v, r)


def _fused_norm(x, mode, weight, bias, eps, groups, normalized, epilogue: Epilogue, v, r) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(x):
        return fused_norm_reference(x, mode, weight, bias, eps, groups, normalized, epilogue, v, r)
    x = x.contiguous()
    if mode == "group":
        C = x.shape[1]
        inner = x[0, 0].numel()
        G, CPG, INNER = groups, C // groups, inner
        L = CPG * inner
    else:
        L = 1
        for d in x.shape[x.dim() - normalized :]:
            L *= d
        G, CPG, INNER = 1, L, 1
    rows = x.numel() // L if L else 0
    y = torch.empty_like(x)
    if rows == 0:
        return y
    block = min(next_pow2(L), MAX_BLOCK)
    r = r.contiguous() if r is not None else None
    _norm_kernel[(rows,)](
        x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        v if v is not None else x,
        r if r is not None else x,
        y,
        L,
        G,
        CPG,
        INNER,
        float(eps),
        MODE=MODES[mode],
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_V=v is not None,
        HAS_R=r is not None,
        **kernel_args(epilogue),
        BLOCK=block,
        SINGLE=block >= L,
    )
    return y


def fused_norm_reference(
    x, mode, weight=None, bias=None, eps=1e-5, groups=1, normalized=1, epilogue: Epilogue = (), v=None, r=None
):
    if mode == "layer":
        y = F.layer_norm(x, x.shape[x.dim() - normalized :], weight, bias, eps)
    elif mode == "rms":
        y = F.rms_norm(x, x.shape[x.dim() - normalized :], weight, eps)
        if bias is not None:
            y = y + bias
    else:
        y = F.group_norm(x, groups, weight, bias, eps)
    if v is not None and mode == "group":
        v = v.reshape(-1, *([1] * (x.dim() - 2)))
    return torch_apply(y, epilogue, v, r, inplace=True)


def _op(
    x: torch.Tensor,
    mode: str,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    groups: int,
    normalized: int,
    epilogue: str,
    v: torch.Tensor | None,
    r: torch.Tensor | None,
) -> torch.Tensor:
    return _fused_norm(x, mode, weight, bias, eps, groups, normalized, decode(epilogue), v, r)


def _fake(x, mode, weight, bias, eps, groups, normalized, epilogue, v, r):
    return x.new_empty(x.shape)


_OP = custom_ops.define(
    "fused_norm",
    "(Tensor x, str mode, Tensor? weight, Tensor? bias, float eps, int groups, int normalized, str epilogue, "
    "Tensor? v, Tensor? r) -> Tensor",
    _op,
    _fake,
)

"""Softmax, log-softmax and log-sum-exp over the last dim, with the input scale fused in.

softmax(x * s) unfused is a scale pass plus the softmax's own passes (max, sum, write). Here a row
that fits one block is read once and written once; a longer row is read twice (an online pass
that keeps the running max and rescales the running sum, then the output pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetforge.kernels.triton import configs, custom_ops
from hetforge.kernels.triton.epilogue import next_pow2

MODES = {"softmax": 0, "log_softmax": 1, "logsumexp": 2}
MAX_BLOCK = 8192


@triton.autotune(configs=configs.row_configs(), key=["L", "BLOCK", "MODE"])
@triton.jit
def _softmax_kernel(x_ptr, y_ptr, L, scale, MODE: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * L
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < L
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
        m = tl.max(x, axis=0)
        s = tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0)
    else:
        m_vec = tl.full((BLOCK,), -float("inf"), tl.float32)
        s_vec = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, L, BLOCK):
            xb = tl.load(x_row + start + cols, mask=start + cols < L, other=-float("inf")).to(tl.float32) * scale
            m_new = tl.maximum(m_vec, xb)
            # lanes still at -inf contribute 0 and must not produce inf - inf
            alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp(m_vec - m_new))
            s_vec = s_vec * alpha + tl.where(m_new == -float("inf"), 0.0, tl.exp(xb - m_new))
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        s = tl.sum(tl.where(m_vec == -float("inf"), 0.0, s_vec * tl.exp(m_vec - m)), axis=0)
    if MODE == 2:
        tl.store(y_ptr + row, (m + tl.log(s)).to(y_ptr.dtype.element_ty))
    else:
        for start in range(0, L, BLOCK):
            c = start + cols
            mk = c < L
            if SINGLE:
                xb = x
            else:
                xb = tl.load(x_row + c, mask=mk, other=-float("inf")).to(tl.float32) * scale
            if MODE == 0:
                y = tl.exp(xb - m) / s
            else:
                y = xb - m - tl.log(s)
            tl.store(y_ptr + row * L + c, y.to(y_ptr.dtype.element_ty), mask=mk)


def fused_softmax(x: torch.Tensor, mode: str = "softmax", scale: float = 1.0) -> torch.Tensor:
    """softmax / log_softmax / logsumexp of `x * scale` over the last dim."""
    if configs.runs_triton(x) and not custom_ops.direct(x):
        return _OP(x, mode, float(scale))
    return _fused_softmax(x, mode, scale)


def _fused_softmax(x: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """The launcher under the public function and its op (the torch path where the kernel does not run)."""
    if not configs.runs_triton(x):
        return fused_softmax_reference(x, mode, scale)
    x = x.contiguous()
    L = x.shape[-1]
    rows = x.numel() // L if L else 0
    out_shape = x.shape[:-1] if mode == "logsumexp" else x.shape
    y = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    if rows == 0:
        return y
    block = min(next_pow2(L), MAX_BLOCK)
    _softmax_kernel[(rows,)](x, y, L, float(scale), MODE=MODES[mode], BLOCK=block, SINGLE=block >= L)
    return y


def fused_softmax_reference(x, mode="softmax", scale=1.0):
    if scale != 1.0:
        x = x * scale
    if mode == "softmax":
        return torch.softmax(x, dim=-1)
    if mode == "log_softmax":
        return torch.log_softmax(x, dim=-1)
    return torch.logsumexp(x, dim=-1)


def _fake(x: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] if mode == "logsumexp" else x.shape)


_OP = custom_ops.define("fused_softmax", "(Tensor x, str mode, float scale) -> Tensor", _fused_softmax, _fake)

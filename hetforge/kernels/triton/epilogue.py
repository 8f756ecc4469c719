"""The pointwise op language shared by every fused kernel: an epilogue is a short chain of ops.

An `Epilogue` is a tuple of `Op`s applied in order to each element after the kernel's main work
(a GEMM tile, a normalized row, a loaded element). Each op reads at most one float parameter, one
per-channel vector `v` (the caller says which channel an element belongs to) or one full-size
tensor `r` (a residual). Op codes are Triton constexprs, so a kernel compiles only the ops it uses:
a chain costs no extra memory traffic beyond the operands it reads.

`torch_apply` is the eager reference for the same chain, used by the CPU path and by the tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_OPS = 8  # slots compiled into each kernel; longer chains are split by the matcher

# op codes (constexpr in the kernels; 0 = empty slot)
CODES = {
    "add": 1,
    "mul": 2,
    "relu": 3,
    "leaky_relu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
    "silu": 7,
    "sigmoid": 8,
    "tanh": 9,
    "clamp_min": 10,
    "clamp_max": 11,
    "add_v": 12,
    "mul_v": 13,
    "add_r": 14,
    "mul_r": 15,
    "hardswish": 16,
    "rsub": 17,
    "exp": 18,
    "abs": 19,
    "softplus": 20,
    "mish": 21,
    "sub_v": 22,
}
TAKES_SCALAR = {"add", "mul", "leaky_relu", "clamp_min", "clamp_max", "rsub"}
TAKES_VECTOR = {"add_v", "mul_v", "sub_v"}
TAKES_RESIDUAL = {"add_r", "mul_r"}


@dataclass(frozen=True)
class Op:
    name: str
    param: float = 0.0  # the scalar of add / mul / leaky_relu / clamp_* / rsub

    def __post_init__(self):
        if self.name not in CODES:
            raise ValueError(f'Got "{self.name}" for an epilogue op: one of {", ".join(CODES)}.')


Epilogue = tuple[Op, ...]


def uses_vector(ep: Epilogue) -> bool:
    return any(op.name in TAKES_VECTOR for op in ep)


def uses_residual(ep: Epilogue) -> bool:
    return any(op.name in TAKES_RESIDUAL for op in ep)


def kernel_args(ep: Epilogue) -> dict:
    """The OP0..OP7 constexprs and P0..P7 scalars a kernel takes for `ep`."""
    if len(ep) > MAX_OPS:
        raise ValueError(f"Got {len(ep)} ops for an epilogue: at most {MAX_OPS}.")
    if sum(op.name in TAKES_VECTOR for op in ep) > 1 or sum(op.name in TAKES_RESIDUAL for op in ep) > 1:
        raise ValueError("an epilogue reads at most one vector and one residual operand")
    args = {}
    for i in range(MAX_OPS):
        op = ep[i] if i < len(ep) else None
        args[f"OP{i}"] = CODES[op.name] if op else 0
        args[f"P{i}"] = float(op.param) if op else 0.0
    return args


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: no tanh intrinsic on every Triton version; absolute error ~1e-7
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|); torch switches to x above 20
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def apply_op(x, OP: tl.constexpr, p, v, r):
    """One op on a block `x`; `v` is the gathered channel vector, `r` the residual block."""
    if OP == 1:
        x = x + p
    elif OP == 2:
        x = x * p
    elif OP == 3:
        x = tl.maximum(x, 0.0)
    elif OP == 4:
        x = tl.where(x >= 0.0, x, x * p)
    elif OP == 5:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif OP == 6:
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif OP == 7:
        x = x / (1.0 + tl.exp(-x))
    elif OP == 8:
        x = 1.0 / (1.0 + tl.exp(-x))
    elif OP == 9:
        x = _tanh(x)
    elif OP == 10:
        x = tl.maximum(x, p)
    elif OP == 11:
        x = tl.minimum(x, p)
    elif OP == 12:
        x = x + v
    elif OP == 13:
        x = x * v
    elif OP == 14:
        x = x + r
    elif OP == 15:
        x = x * r
    elif OP == 16:
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif OP == 17:
        x = p - x
    elif OP == 18:
        x = tl.exp(x)
    elif OP == 19:
        x = tl.abs(x)
    elif OP == 20:
        x = _softplus(x)
    elif OP == 21:
        x = x * _tanh(_softplus(x))
    elif OP == 22:
        x = x - v
    return x


@triton.jit
def apply_chain(
    x,
    v,
    r,
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
):
    x = apply_op(x, OP0, P0, v, r)
    x = apply_op(x, OP1, P1, v, r)
    x = apply_op(x, OP2, P2, v, r)
    x = apply_op(x, OP3, P3, v, r)
    x = apply_op(x, OP4, P4, v, r)
    x = apply_op(x, OP5, P5, v, r)
    x = apply_op(x, OP6, P6, v, r)
    x = apply_op(x, OP7, P7, v, r)
    return x


def torch_apply(
    x: torch.Tensor, ep: Epilogue, v: torch.Tensor | None = None, r: torch.Tensor | None = None, inplace: bool = False
) -> torch.Tensor:
    """The eager reference of `ep` (and the CPU path: in place when the caller owns `x`).

    `v` must already broadcast against `x` (the caller views it as [C, 1, ...] or [N]).
    """
    if not inplace:
        x = x.clone()
    for op in ep:
        n, p = op.name, op.param
        if n == "add":
            x.add_(p)
        elif n == "mul":
            x.mul_(p)
        elif n == "relu":
            x.relu_()
        elif n == "leaky_relu":
            F.leaky_relu_(x, p)
        elif n == "gelu":
            x = F.gelu(x)
        elif n == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif n == "silu":
            x = F.silu(x, inplace=True)
        elif n == "sigmoid":
            x.sigmoid_()
        elif n == "tanh":
            x.tanh_()
        elif n == "clamp_min":
            x.clamp_min_(p)
        elif n == "clamp_max":
            x.clamp_max_(p)
        elif n == "add_v":
            x.add_(v)
        elif n == "sub_v":
            x.sub_(v)
        elif n == "mul_v":
            x.mul_(v)
        elif n == "add_r":
            x.add_(r)
        elif n == "mul_r":
            x.mul_(r)
        elif n == "hardswish":
            x = F.hardswish(x, inplace=True)
        elif n == "rsub":
            x.neg_().add_(p)
        elif n == "exp":
            x.exp_()
        elif n == "abs":
            x.abs_()
        elif n == "softplus":
            x = F.softplus(x)
        elif n == "mish":
            x = F.mish(x, inplace=True)
    return x


def encode(ep: Epilogue) -> str:
    """`ep` as the string a custom op's schema carries: `name:param` per op, comma-separated ("" if empty).

    `repr` of a float reads back to the same float, so `decode(encode(ep)) == ep` exactly.
    """
    return ",".join(f"{op.name}:{float(op.param)!r}" for op in ep)


@functools.lru_cache(maxsize=4096)
def decode(text: str) -> Epilogue:
    """The epilogue `encode` wrote: parsed once per distinct string (a compiled graph repeats a few)."""
    if not text:
        return ()
    ops = []
    for part in text.split(","):
        name, sep, param = part.partition(":")
        if not sep:
            raise ValueError(f'Got "{part}" for an encoded epilogue op: NAME:PARAM, as `encode` writes it.')
        ops.append(Op(name, float(param)))
    return tuple(ops)


def describe(ep: Epilogue) -> str:
    return (
        " -> ".join(op.name if op.name not in TAKES_SCALAR else f"{op.name}({op.param:g})" for op in ep) or "identity"
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))

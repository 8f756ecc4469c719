"""nn.Modules around the Triton kernels: what the library agent puts into a stage's graph.

Each module owns its parameters as buffers (copied from the stage's own instance, so a variant
built from a checkpoint-loaded module carries that checkpoint's weights) and the epilogue chain
the matcher found. On CUDA (or under `TRITON_INTERPRET=1`) they run the kernels. On the CPU the GEMM
and convolution modules run oneDNN with packed weights and a fused post-op (`onednn`); the others
their torch path (in-place chains on a fresh output: fewer allocations than the eager graph).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetforge.kernels import onednn
from hetforge.kernels.triton.configs import runs_triton
from hetforge.kernels.triton.epilogue import Epilogue, describe
from hetforge.kernels.triton.gemm_epilogue import bmm_epilogue, gemm_epilogue, split_tf32
from hetforge.kernels.triton.norm import fused_norm
from hetforge.kernels.triton.pointwise import pointwise_chain
from hetforge.kernels.triton.reduce import fused_reduce
from hetforge.kernels.triton.softmax import fused_softmax


def _buffer(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    module.register_buffer(name, value.detach().clone().contiguous() if value is not None else None)


class FusedLinear(nn.Module):
    """chain(x @ W^T + b) in one GEMM kernel.

    The weight stays [N, K] (K-major, as TF32 tensor-core products want it). Under the `strict`
    policy an fp32 weight is split once here into its TF32 high part (`weight`) and remainder
    (`weight_lo`), so each call splits only the activation (see gemm_epilogue's docstring).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        epilogue: Epilogue = (),
        vector: torch.Tensor | None = None,
        precision: str = "strict",
    ):
        super().__init__()
        weight = weight.detach()
        lo = None
        if precision == "strict" and weight.dtype == torch.float32:
            weight, lo = split_tf32(weight)
        _buffer(self, "weight", weight)
        _buffer(self, "weight_lo", lo)
        _buffer(self, "bias", bias)
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.epilogue, self.precision = tuple(epilogue), precision
        self._onednn = onednn.PackedWeight()

    def forward(self, x, residual=None):
        if not runs_triton(x) and onednn.runs_onednn(x):
            packed, bias, epilogue, vector = self._onednn.get(
                (self.weight, self.weight_lo, self.bias, self.vector), lambda: self._pack(x)
            )
            return onednn.linear_epilogue(x, packed, bias, epilogue, vector, residual)
        lo = self.weight_lo.t() if self.weight_lo is not None else None
        return gemm_epilogue(
            x, self.weight.t(), self.bias, self.epilogue, self.vector, residual, self.precision, w_lo_t=lo
        )

    def _pack(self, x):
        """The CPU's oneDNN operands: the whole fp32 weight (its split parts add up to it exactly), packed; a
        leading vector add folded into the bias."""
        weight = self.weight + self.weight_lo if self.weight_lo is not None else self.weight
        epilogue, bias, vector = onednn.fold_vector_bias(self.epilogue, self.bias, self.vector, weight.shape[0])
        rows = x.numel() // max(1, x.shape[-1])
        return onednn.pack_linear(weight.float(), rows), bias, epilogue, vector

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        split = ", weight split into TF32 parts" if self.weight_lo is not None else ""
        return f"in={k}, out={n}, epilogue={describe(self.epilogue)}, precision={self.precision}{split}"


class FusedConv(nn.Module):
    """chain(conv(x)) for an fp32 1-D or 2-D convolution (zeros padding, numeric padding).

    On CUDA: cuDNN's convolution, then the chain in one Triton pass. With `split` (the `strict` policy, where
    cuDNN convolves fp32 on the CUDA cores, ~40 TFLOPS on an H100), the convolution runs as three TF32
    tensor-core convolutions of split operands: with x = x_hi + x_lo and w = w_hi + w_lo, every part exact
    in TF32 (`split_tf32`; the weight once, here), x*w = x_lo*w_hi + x_hi*w_lo + x_hi*w_hi (+ x_lo*w_lo,
    below fp32's resolution), accumulating in fp32, the small terms first. TF32 is asked for per call
    (`torch.cudnn_convolution(..., allow_tf32=True)`), not through the process-wide flag another thread's
    convolution would see. On the CPU, with a chain: oneDNN with the weight packed and the chain's head fused (`onednn`).
    """

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        epilogue: Epilogue = (),
        vector: torch.Tensor | None = None,
        split: bool = False,
    ):
        super().__init__()
        _buffer(self, "weight", conv.weight)
        hi, lo = split_tf32(conv.weight.detach().float()) if split else (None, None)
        _buffer(self, "weight_hi", hi)
        _buffer(self, "weight_lo", lo)
        _buffer(self, "bias", conv.bias)
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = (
            tuple(conv.stride),
            tuple(conv.padding),
            tuple(conv.dilation),
            conv.groups,
        )
        self.epilogue = tuple(epilogue)
        self._onednn = onednn.PackedWeight()

    def forward(self, x, residual=None):
        if (
            self.epilogue and not runs_triton(x) and onednn.runs_onednn(x)
        ):  # a plain convolution: eager's oneDNN call is as fast
            return self._forward_onednn(x, residual)
        if self.weight_hi is not None and x.is_cuda and x.dtype == torch.float32:
            out = self._split_tf32(x)
        else:
            conv = F.conv1d if self.dims == 1 else F.conv2d
            out = conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return pointwise_chain(out, self.epilogue, self.vector, 1, residual) if self.epilogue else out

    def _as_2d(self) -> tuple[tuple, tuple, tuple]:
        """stride, padding, dilation of the 2-D convolution that computes this one (a 1-D one has height 1)."""
        if self.dims == 1:
            return (1, *self.stride), (0, *self.padding), (1, *self.dilation)
        return self.stride, self.padding, self.dilation

    def _split_tf32(self, x):
        w_hi, w_lo = self.weight_hi, self.weight_lo
        if self.dims == 1:
            x, w_hi, w_lo = x.unsqueeze(2), w_hi.unsqueeze(2), w_lo.unsqueeze(2)
        stride, padding, dilation = self._as_2d()
        x_hi, x_lo = split_tf32(x)

        def tf32(a, w):
            return torch.cudnn_convolution(a, w, padding, stride, dilation, self.groups, True, False, True)

        out = tf32(x_lo, w_hi)
        out += tf32(x_hi, w_lo)
        out += tf32(x_hi, w_hi)
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1)
        return out.squeeze(2) if self.dims == 1 else out

    def _forward_onednn(self, x, residual):
        if self.dims == 1:  # oneDNN's convolution ops take 2-D (and 3-D) convolutions: height 1
            x, residual = x.unsqueeze(2), residual.unsqueeze(2) if residual is not None else None
        stride, padding, dilation = self._as_2d()

        def pack():
            weight = self.weight.unsqueeze(2) if self.dims == 1 else self.weight
            epilogue, bias, vector = onednn.fold_vector_bias(self.epilogue, self.bias, self.vector, weight.shape[0])
            packed = onednn.pack_conv(weight.float(), padding, stride, dilation, self.groups, tuple(x.shape))
            return packed, bias, epilogue, vector.view(-1, 1, 1) if vector is not None else None

        packed, bias, epilogue, vector = self._onednn.get((self.weight, self.bias, self.vector), pack)
        out = onednn.conv_epilogue(x, packed, bias, padding, stride, dilation, self.groups, epilogue, vector, residual)
        return out.squeeze(2) if self.dims == 1 else out

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        split = ", split TF32 x3 on CUDA" if self.weight_hi is not None else ""
        return (
            f"{i}->{o}, kernel={tuple(self.weight.shape[2:])}, stride={self.stride}, padding={self.padding}, "
            f"epilogue={describe(self.epilogue)}{split}"
        )


class FusedBmm(nn.Module):
    """chain(a @ b) for batched products of two activations ([B, M, K] @ [B, K, N])."""

    def __init__(self, epilogue: Epilogue = (), vector: torch.Tensor | None = None, precision: str = "strict"):
        super().__init__()
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.epilogue, self.precision = tuple(epilogue), precision

    def forward(self, a, b, residual=None):
        return bmm_epilogue(a, b, self.epilogue, self.vector, residual, self.precision)

    def extra_repr(self) -> str:
        return f"epilogue={describe(self.epilogue)}, precision={self.precision}"


class FusedNorm(nn.Module):
    """chain(norm(x)) for layer / rms / group norm."""

    def __init__(
        self,
        mode: str,
        weight=None,
        bias=None,
        eps: float = 1e-5,
        groups: int = 1,
        normalized: int = 1,
        epilogue: Epilogue = (),
        vector=None,
    ):
        super().__init__()
        _buffer(self, "weight", weight)
        _buffer(self, "bias", bias)
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.mode, self.eps, self.groups, self.normalized, self.epilogue = (
            mode,
            float(eps),
            groups,
            normalized,
            tuple(epilogue),
        )

    def forward(self, x, residual=None):
        return fused_norm(
            x,
            self.mode,
            self.weight,
            self.bias,
            self.eps,
            self.groups,
            self.normalized,
            self.epilogue,
            self.vector,
            residual,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode}, eps={self.eps:g}, groups={self.groups}, epilogue={describe(self.epilogue)}"


class FusedSoftmax(nn.Module):
    """softmax / log_softmax / logsumexp of x * scale over the last dim."""

    def __init__(self, mode: str = "softmax", scale: float = 1.0, keepdim: bool = False):
        super().__init__()
        self.mode, self.scale, self.keepdim = mode, float(scale), keepdim

    def forward(self, x):
        y = fused_softmax(x, self.mode, self.scale)
        return y.unsqueeze(-1) if self.mode == "logsumexp" and self.keepdim else y

    def extra_repr(self) -> str:
        return f"mode={self.mode}, scale={self.scale:g}"


class PointwiseChain(nn.Module):
    """A chain of pointwise ops in one pass; `vector` is per channel along `vector_dim`."""

    def __init__(self, epilogue: Epilogue, vector=None, vector_dim: int = 1):
        super().__init__()
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.epilogue, self.vector_dim = tuple(epilogue), vector_dim

    def forward(self, x, residual=None):
        return pointwise_chain(x, self.epilogue, self.vector, self.vector_dim, residual)

    def extra_repr(self) -> str:
        return f"epilogue={describe(self.epilogue)}"


class FusedReduce(nn.Module):
    """`kind` over `dim` of prologue(x), prologue fused into the loads."""

    def __init__(self, kind: str, dim: int, keepdim: bool, prologue: Epilogue = (), vector=None, vector_dim: int = 1):
        super().__init__()
        _buffer(self, "vector", vector.reshape(-1) if vector is not None else None)
        self.kind, self.dim, self.keepdim, self.prologue, self.vector_dim = (
            kind,
            dim,
            keepdim,
            tuple(prologue),
            vector_dim,
        )

    def forward(self, x):
        return fused_reduce(x, self.kind, self.dim, self.keepdim, self.prologue, self.vector, self.vector_dim)

    def extra_repr(self) -> str:
        return f"{self.kind}(dim={self.dim}, keepdim={self.keepdim}) of {describe(self.prologue)}"

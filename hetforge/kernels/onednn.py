"""The CPU path of the library's GEMM and convolution modules: oneDNN with packed weights and a fused post-op.

Off CUDA the Triton kernels do not run, and eager `F.linear` goes to MKL's sgemm. On this project's
AMD EPYC hosts oneDNN's packed-weight GEMM with a fused post-op (`torch.ops.mkldnn._linear_pointwise`,
one of the ops Inductor's own CPU fusions emit) runs the same fp32 products 2.0-2.2x faster on the
suite's shapes (256x512x512 on 2 cores: 0.64 -> 0.30 ms; bench/kernels/probe_cpu_onednn.py,
results_cpu_onednn.txt).
The weight is packed once into oneDNN's blocked layout, on the first CPU call (the module may be
moved between devices before that), and packed again only if the weight tensor changes.

oneDNN applies one post-op inside the GEMM or convolution: the first op of the epilogue when it is
one oneDNN has (`POST_OPS`; a clamp_min/clamp_max pair is its hardtanh), or an add of the residual;
the rest of the chain runs in place on the fresh output (`torch_apply`). A per-channel add right
after the product is folded into the bias first. Products are fp32 (oneDNN's default fp32 math mode,
no implicit down-conversion): the results match eager within fp32 rounding.
"""

from __future__ import annotations

import torch

from hetforge.kernels.triton.epilogue import Epilogue, torch_apply

# epilogue op -> (oneDNN post-op name, algorithm); leaky_relu passes its slope as the scalar
POST_OPS = {
    "relu": ("relu", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "tanh": ("tanh", ""),
    "sigmoid": ("sigmoid", ""),
    "silu": ("swish", ""),
    "hardswish": ("hardswish", ""),
    "leaky_relu": ("leaky_relu", ""),
}


def available() -> bool:
    """oneDNN is built in, enabled, and has the fused ops this module calls."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_convolution_pointwise")
    )


def runs_onednn(x: torch.Tensor) -> bool:
    """An fp32 CPU tensor in eager mode: under torch.compile the module hands Inductor its plain torch ops
    (Inductor cannot lower a packed weight it did not pack; with `freezing` it packs its own)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling() and available()


def split_post_op(ep: Epilogue) -> tuple[tuple[str, list, str] | None, Epilogue]:
    """(oneDNN's unary post-op for the head of `ep`, or None; the ops left to apply after it)."""
    if not ep:
        return None, ep
    head = ep[0]
    if head.name in POST_OPS:
        attr, algorithm = POST_OPS[head.name]
        return (attr, [head.param] if head.name == "leaky_relu" else [], algorithm), ep[1:]
    if len(ep) >= 2 and head.name == "clamp_min" and ep[1].name == "clamp_max" and head.param <= ep[1].param:
        return ("hardtanh", [head.param, ep[1].param], ""), ep[2:]
    return None, ep


def fold_vector_bias(
    ep: Epilogue, bias: torch.Tensor | None, v: torch.Tensor | None, channels: int
) -> tuple[Epilogue, torch.Tensor | None, torch.Tensor | None]:
    """A leading add_v / sub_v of a per-output-channel vector, moved into the bias (once, at packing)."""
    if ep and ep[0].name in ("add_v", "sub_v") and v is not None and v.numel() == channels:
        vec = v.reshape(-1) if ep[0].name == "add_v" else -v.reshape(-1)
        return ep[1:], (bias + vec if bias is not None else vec.clone()), None
    return ep, bias, v


class PackedWeight:
    """What `pack()` makes of its source tensors (a weight in oneDNN's layout, a folded bias), made on first
    use and again if a source tensor changes (another storage, or written in place)."""

    def __init__(self):
        self.key: tuple | None = None
        self.packed = None

    def __deepcopy__(self, memo) -> PackedWeight:  # oneDNN tensors have no storage to copy: a copy packs anew
        return PackedWeight()

    def __getstate__(self) -> dict:  # nor to pickle
        return {"key": None, "packed": None}

    def get(self, sources: tuple, pack):
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) if t is not None else None for t in sources)
        if key != self.key:
            self.packed, self.key = pack(), key
        return self.packed


def pack_linear(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, K] fp32 weight -> oneDNN's packed layout, chosen for about `rows` rows of input."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(1, rows))


def linear_epilogue(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    ep: Epilogue,
    v: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> torch.Tensor:
    """chain(x @ W^T + bias) with W packed by `pack_linear`; any leading dims on x (a vector add is folded by the caller)."""
    if ep and ep[0].name == "add_r" and r is not None:
        out = torch.ops.mkldnn._linear_pointwise.binary(x, r, packed, bias, "add")
        return torch_apply(out, ep[1:], v, r, inplace=True)
    post, rest = split_post_op(ep)
    attr, scalars, algorithm = post or ("none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, scalars, algorithm)
    return torch_apply(out, rest, v, r, inplace=True)


def pack_conv(weight: torch.Tensor, padding, stride, dilation, groups: int, input_size) -> torch.Tensor:
    """A conv1d/conv2d weight in oneDNN's layout, chosen for inputs of `input_size` (a 1-D conv as 2-D of height 1)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.detach().contiguous(), list(padding), list(stride), list(dilation), groups, list(input_size)
    )


def conv_epilogue(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    padding,
    stride,
    dilation,
    groups: int,
    ep: Epilogue,
    v: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> torch.Tensor:
    """chain(conv(x) + bias); v is viewed per channel (dim 1) by the caller, r has the output's shape."""
    post, rest = split_post_op(ep)
    attr, scalars, algorithm = post or ("none", [], "")
    out = torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(padding), list(stride), list(dilation), groups, attr, scalars, algorithm
    )
    return torch_apply(out, rest, v, r, inplace=True)


__all__ = [
    "POST_OPS",
    "PackedWeight",
    "available",
    "conv_epilogue",
    "fold_vector_bias",
    "linear_epilogue",
    "pack_conv",
    "pack_linear",
    "runs_onednn",
    "split_post_op",
]

"""The library agent: match graph patterns of a stage to the hand-written Triton kernels.

On a graph of the stage's own instance (real weights; `capture`: torch.export's ATen graph, else
torch.fx's, so both `aten.linear` and `call_module(nn.Linear)` forms are matched), with shapes from
the capture or from one propagation of example inputs:
  linear -> chain          FusedLinear (GEMM + epilogue; also alone: fp32-accurate split TF32 products on CUDA)
  fp32 conv1d / conv2d -> chain   FusedConv (CPU: oneDNN, post-op fused; CUDA: cuDNN + the chain in one pass,
                                  as three TF32 convolutions of split operands under `strict` when K >= SPLIT_CONV_MIN_K)
  bmm / matmul of two 3-D activations -> chain   FusedBmm (the same kernel over a batch)
  layer/rms/group norm -> chain   FusedNorm
  (x * s) -> softmax / log_softmax / logsumexp over the last dim   FusedSoftmax
  chain -> sum / mean / amax / amin over one dim    FusedReduce (chain as prologue)
  any other chain of two or more pointwise ops      PointwiseChain
A chain is a run of single-user pointwise nodes: scalars, at most one per-channel parameter
(a "vector") and at most one full-size tensor (a "residual") as operands. Matching is generic
over graphs; the result is a candidate like any other and goes through the verifier.

Over 450 lines: the pattern tables (torch.fx and ATen spellings of the same operations) and the
matcher that walks them belong together; the kernels themselves live in `hetforge/kernels/`.
"""

from __future__ import annotations

import copy
import operator
import types
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from hetforge.kernels.modules import (
    FusedBmm,
    FusedConv,
    FusedLinear,
    FusedNorm,
    FusedReduce,
    FusedSoftmax,
    PointwiseChain,
)
from hetforge.kernels.triton.epilogue import MAX_OPS, Op
from hetforge.optimizer.capture import EXPORT, CaptureError, capture

aten = torch.ops.aten

_UNARY_MODULES = {
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
}
_UNARY_FUNCS = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.silu: "silu",
    F.hardswish: "hardswish",
    torch.exp: "exp",
    torch.abs: "abs",
    F.mish: "mish",
}
_UNARY_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "exp": "exp", "abs": "abs"}
_BINARY = {
    operator.add: "add",
    torch.add: "add",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.truediv: "div",
    torch.div: "div",
}
_BINARY_METHODS = {"add": "add", "mul": "mul", "sub": "sub", "div": "div"}
_REDUCE_FUNCS = {torch.sum: "sum", torch.mean: "mean", torch.amax: "max", torch.amin: "min"}
# The same operations in torch.export's ATen graphs (the training IR keeps linear, layer_norm, gelu, softmax).
_UNARY_FUNCS.update(
    {
        aten.relu.default: "relu",
        aten.sigmoid.default: "sigmoid",
        aten.tanh.default: "tanh",
        aten.exp.default: "exp",
        aten.abs.default: "abs",
        aten.silu.default: "silu",
        aten.hardswish.default: "hardswish",
        aten.mish.default: "mish",
    }
)
_BINARY.update(
    {
        aten.add.Tensor: "add",
        aten.add.Scalar: "add",
        aten.mul.Tensor: "mul",
        aten.mul.Scalar: "mul",
        aten.sub.Tensor: "sub",
        aten.sub.Scalar: "sub",
        aten.div.Tensor: "div",
        aten.div.Scalar: "div",
    }
)
_ATEN_REDUCE = {aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "max", aten.amin.default: "min"}
_ATEN_SOFTMAX = {
    aten.softmax.int: "softmax",
    aten._softmax.default: "softmax",
    aten.log_softmax.int: "log_softmax",
    aten._log_softmax.default: "log_softmax",
}
_REDUCE_METHODS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min"}


@dataclass
class _Chain:
    ops: list[Op] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    vector: torch.Tensor | None = None
    residual: fx.Node | None = None


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _kwarg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pointwise(
    gm: fx.GraphModule, node: fx.Node, x: fx.Node
) -> tuple[list[Op], torch.Tensor | None, fx.Node | None] | None:
    """The ops `node` applies to its input `x` (with a vector or residual operand), or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if node.args[:1] != (x,) or len(node.args) != 1:
            return None
        if type(mod) in _UNARY_MODULES:
            return [Op(_UNARY_MODULES[type(mod)])], None, None
        if isinstance(mod, nn.GELU):
            return [Op("gelu_tanh" if mod.approximate == "tanh" else "gelu")], None, None
        if isinstance(mod, nn.LeakyReLU):
            return [Op("leaky_relu", mod.negative_slope)], None, None
        if isinstance(mod, nn.Hardtanh):
            return [Op("clamp_min", mod.min_val), Op("clamp_max", mod.max_val)], None, None
        if isinstance(mod, nn.Softplus) and mod.beta == 1 and mod.threshold == 20:
            return [Op("softplus")], None, None
        if isinstance(mod, (nn.Identity, nn.Dropout)) and not mod.training:
            return [], None, None
        return None
    target = node.target
    kwargs = {
        k: v for k, v in node.kwargs.items() if not (k == "inplace" and v is False)
    }  # fx keeps F.relu's inplace=False
    if node.op == "call_function" and target in _UNARY_FUNCS or node.op == "call_method" and target in _UNARY_METHODS:
        if node.args != (x,) or kwargs:
            return None
        return [Op(_UNARY_FUNCS.get(target) or _UNARY_METHODS[target])], None, None
    if node.op == "call_function" and target in (F.gelu, aten.gelu.default) and node.args[:1] == (x,):
        approx = _kwarg(node, 1, "approximate", "none")
        return [Op("gelu_tanh" if approx == "tanh" else "gelu")], None, None
    if node.op == "call_function" and target in (F.leaky_relu, aten.leaky_relu.default) and node.args[:1] == (x,):
        return [Op("leaky_relu", float(_kwarg(node, 1, "negative_slope", 0.01)))], None, None
    if node.op == "call_function" and target is aten.dropout.default and node.args[:1] == (x,):
        # eval-mode dropout (train=False) is the identity; in training it is not pointwise-deterministic
        return ([], None, None) if not _kwarg(node, 2, "train", True) else None
    if node.op == "call_function" and target in (aten.clamp_min.default, aten.clamp_max.default):
        value = _kwarg(node, 1, "min" if target is aten.clamp_min.default else "max")
        if node.args[:1] != (x,) or not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return [Op("clamp_min" if target is aten.clamp_min.default else "clamp_max", float(value))], None, None
    hardtanh = (F.hardtanh, aten.hardtanh.default)
    if (node.op == "call_function" and target in (torch.clamp, aten.clamp.default, *hardtanh)) or (
        node.op == "call_method" and target == "clamp"
    ):
        if node.args[:1] != (x,):
            return None
        names = ("min_val", "max_val") if target in hardtanh else ("min", "max")
        lo = _kwarg(node, 1, names[0], -1.0 if target in hardtanh else None)
        hi = _kwarg(node, 2, names[1], 1.0 if target in hardtanh else None)
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return None
        return [Op(n, float(v)) for n, v in (("clamp_min", lo), ("clamp_max", hi)) if v is not None], None, None
    kind = (
        _BINARY.get(target)
        if node.op == "call_function"
        else _BINARY_METHODS.get(target)
        if node.op == "call_method"
        else None
    )
    if kind is None or len(node.args) != 2 or {k: v for k, v in node.kwargs.items() if (k, v) != ("alpha", 1)}:
        return None
    a, b = node.args
    if a is not x and b is not x or a is b:
        return None
    other, x_first = (b, True) if a is x else (a, False)
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        c = float(other)
        if kind == "add":
            return [Op("add", c)], None, None
        if kind == "mul":
            return [Op("mul", c)], None, None
        if kind == "sub":
            return ([Op("add", -c)] if x_first else [Op("rsub", c)]), None, None
        if kind == "div" and x_first and c != 0:
            return [Op("mul", 1.0 / c)], None, None
        return None
    x_shape = _shape(x)
    tensor = _attr(gm, other)
    if tensor is not None:  # a parameter or buffer: per-channel vector if it broadcasts along one dim
        if x_shape is None or torch.broadcast_shapes(tuple(tensor.shape), x_shape) != x_shape or tensor.numel() <= 1:
            return None
        if kind == "add":
            return [Op("add_v")], tensor, None
        if kind == "mul":
            return [Op("mul_v")], tensor, None
        if kind == "sub" and x_first:
            return [Op("sub_v")], tensor, None
        if kind == "div" and x_first:
            return [Op("mul_v")], 1.0 / tensor, None
        return None
    if isinstance(other, fx.Node) and kind in ("add", "mul") and x_shape is not None and _shape(other) == x_shape:
        return [Op("add_r" if kind == "add" else "mul_r")], None, other
    return None


def _vector_dim(vector: torch.Tensor, x_shape: tuple) -> int | None:
    """The one dim of x a broadcast parameter varies along (None if it varies along several)."""
    shape = (1,) * (len(x_shape) - vector.dim()) + tuple(vector.shape)
    dims = [i for i, s in enumerate(shape) if s != 1]
    return dims[0] if len(dims) == 1 else None


def _extend(gm: fx.GraphModule, start: fx.Node, consumed: set, vector_dim_ok, chain: _Chain | None = None) -> _Chain:
    """Grow `chain` (empty by default) forward from `start` through single-user pointwise nodes."""
    chain = chain or _Chain()
    x = chain.nodes[-1] if chain.nodes else start
    while len(x.users) == 1:
        node = next(iter(x.users))
        if node in consumed:
            break
        found = _pointwise(gm, node, x)
        if found is None:
            break
        ops, vector, residual = found
        if (
            len(chain.ops) + len(ops) > MAX_OPS
            or (vector is not None and chain.vector is not None)
            or (residual is not None and chain.residual is not None)
        ):
            break
        if vector is not None and not vector_dim_ok(vector):
            break
        if residual is not None and (residual is start or residual in chain.nodes):
            break
        chain.ops += ops
        chain.nodes.append(node)
        chain.vector = vector if vector is not None else chain.vector
        chain.residual = residual if residual is not None else chain.residual
        x = node
    return chain


def _install(
    gm: fx.GraphModule, module: nn.Module, first: fx.Node, last: fx.Node, args: tuple, dead: list[fx.Node], tag: str
) -> None:
    name, i = f"hetforge_{tag}", 0
    while hasattr(gm, f"{name}{i}"):
        i += 1
    gm.add_submodule(f"{name}{i}", module)
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(f"{name}{i}", args)
    last.replace_all_uses_with(new)
    if "tensor_meta" in last.meta:
        new.meta["tensor_meta"] = last.meta["tensor_meta"]
    for node in reversed(dead):
        if not node.users:
            gm.graph.erase_node(node)


def _linear_parts(gm, node) -> tuple[fx.Node, torch.Tensor, torch.Tensor | None] | None:
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
        mod = gm.get_submodule(node.target)
        return node.args[0], mod.weight, mod.bias
    if node.op == "call_function" and node.target in (F.linear, aten.linear.default):
        w, b = _attr(gm, _kwarg(node, 1, "weight")), _kwarg(node, 2, "bias")
        if w is not None and (b is None or _attr(gm, b) is not None):
            return node.args[0], w, _attr(gm, b) if b is not None else None
    return None


# Products per output element (in channels per group x kernel size) from which FusedConv's three TF32
# convolutions beat one fp32 convolution. H100, cuDNN 9.19 (bench/kernels/probe_conv_split.py): K = 2304
# 1.60x, 1536 and 1152 1.00x, 288 0.34x, 240 0.64x.
SPLIT_CONV_MIN_K = 2048


def _conv(gm, node):
    """The convolution `node` applies (an nn.Conv1d / nn.Conv2d, or its parameters read off `aten.conv1d/2d`), or
    None unless it is fp32 with numeric zero padding and called on one input."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        mod = gm.get_submodule(node.target)
        if type(mod) not in (nn.Conv1d, nn.Conv2d) or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return None
        return mod if mod.weight.dtype == torch.float32 else None
    if node.op != "call_function" or node.target not in (aten.conv1d.default, aten.conv2d.default) or node.kwargs:
        return None
    w = _attr(gm, node.args[1]) if len(node.args) > 1 else None
    b = node.args[2] if len(node.args) > 2 else None
    bias = _attr(gm, b) if b is not None else None
    if w is None or (b is not None and bias is None) or w.dtype != torch.float32:
        return None
    dims = w.dim() - 2

    def ints(index, default):
        value = node.args[index] if len(node.args) > index else default
        return tuple(value) if isinstance(value, (list, tuple)) and len(value) == dims else (value,) * dims

    if not all(isinstance(v, int) for v in (*ints(3, 1), *ints(4, 0), *ints(5, 1))):
        return None
    groups = node.args[6] if len(node.args) > 6 else 1
    return types.SimpleNamespace(
        weight=w, bias=bias, stride=ints(3, 1), padding=ints(4, 0), dilation=ints(5, 1), groups=groups
    )


def _fusable_conv(gm, node) -> bool:
    """An fp32 convolution with numeric zero padding, called on one input."""
    return _conv(gm, node) is not None


def _splittable_conv(gm, node) -> bool:
    """A fusable convolution with enough products per output for the tensor cores to pay for three convolutions."""
    conv = _conv(gm, node)
    return conv is not None and conv.weight[0].numel() >= SPLIT_CONV_MIN_K


def _bmm_parts(node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) if `node` multiplies two 3-D tensors of one batch size: torch.bmm, torch.matmul or `@`."""
    products = (torch.bmm, torch.matmul, operator.matmul, aten.bmm.default, aten.matmul.default)
    is_product = (node.op == "call_function" and node.target in products) or (
        node.op == "call_method" and node.target in ("bmm", "matmul")
    )
    if not is_product or len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    sa, sb = _shape(node.args[0]), _shape(node.args[1])
    if sa is None or sb is None or len(sa) != 3 or len(sb) != 3 or sa[0] != sb[0] or sa[2] != sb[1]:
        return None
    return node.args[0], node.args[1]


def _norm_parts(gm, node) -> dict | None:
    if node.op == "call_function":
        return _aten_norm_parts(gm, node)
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if isinstance(mod, nn.LayerNorm):
        return dict(mode="layer", weight=mod.weight, bias=mod.bias, eps=mod.eps, normalized=len(mod.normalized_shape))
    if isinstance(mod, getattr(nn, "RMSNorm", ())):
        eps = mod.eps if mod.eps is not None else torch.finfo(torch.float32).eps
        return dict(mode="rms", weight=mod.weight, eps=eps, normalized=len(mod.normalized_shape))
    if isinstance(mod, nn.GroupNorm):
        return dict(mode="group", weight=mod.weight, bias=mod.bias, eps=mod.eps, groups=mod.num_groups)
    return None


def _aten_norm_parts(gm, node) -> dict | None:
    """aten.layer_norm / rms_norm / group_norm with parameters (or None) as get_attr nodes."""

    def param(index):
        arg = node.args[index] if len(node.args) > index else None
        return (True, None) if arg is None else ((value := _attr(gm, arg)) is not None, value)

    if node.target is aten.layer_norm.default and len(node.args) >= 2:
        (ok_w, w), (ok_b, b) = param(2), param(3)
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        return dict(mode="layer", weight=w, bias=b, eps=eps, normalized=len(node.args[1])) if ok_w and ok_b else None
    if node.target is aten.rms_norm.default and len(node.args) >= 2:
        ok_w, w = param(2)
        eps = _kwarg(node, 3, "eps")
        eps = eps if eps is not None else torch.finfo(torch.float32).eps
        return dict(mode="rms", weight=w, eps=eps, normalized=len(node.args[1])) if ok_w else None
    if node.target is aten.group_norm.default and len(node.args) >= 2:
        (ok_w, w), (ok_b, b) = param(2), param(3)
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        return dict(mode="group", weight=w, bias=b, eps=eps, groups=node.args[1]) if ok_w and ok_b else None
    return None


def fuse(
    module: nn.Module, example_inputs: list, precision: str = "strict"
) -> tuple[fx.GraphModule, dict[str, int]] | None:
    """A copy of `module` with library kernels in place of the patterns found; None if it cannot be captured."""
    try:
        gm = capture(module, example_inputs)
    except CaptureError:
        return None
    return gm, fuse_graph(gm, example_inputs, precision)


def fuse_graph(gm: fx.GraphModule, example_inputs: list, precision: str = "strict") -> dict[str, int]:
    """Put library kernels in place of the patterns found in `gm` (in place); how many of each kind."""
    _propagate_shapes(gm, example_inputs)
    counts: dict[str, int] = {}
    consumed: set[fx.Node] = set()

    def note(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    for node in list(gm.graph.nodes):
        if node in consumed or node.graph is not gm.graph or node.op in ("placeholder", "output", "get_attr"):
            continue
        out_shape = _shape(node)
        if _fusable_conv(gm, node) and out_shape is not None:
            split = precision == "strict" and _splittable_conv(gm, node)
            chain = _extend(gm, node, consumed, lambda v, out_shape=out_shape: _vector_dim(v, out_shape) == 1)
            last = chain.nodes[-1] if chain.nodes else node
            args = (node.args[0], chain.residual) if chain.residual is not None else (node.args[0],)
            _install(
                gm,
                FusedConv(_conv(gm, node), tuple(chain.ops), chain.vector, split),
                node,
                last,
                args,
                [node, *chain.nodes],
                "conv",
            )
            consumed.update(chain.nodes)
            note("split_conv" if split else "conv_epilogue")
            continue
        linear = _linear_parts(gm, node)
        if linear is not None and out_shape is not None:
            x, w, b = linear
            n = w.shape[0]
            chain = _extend(gm, node, consumed, lambda v, n=n: v.numel() == n and v.shape[-1] == n)
            last = chain.nodes[-1] if chain.nodes else node
            args = (x, chain.residual) if chain.residual is not None else (x,)
            _install(
                gm,
                FusedLinear(w, b, tuple(chain.ops), chain.vector, precision),
                node,
                last,
                args,
                [node, *chain.nodes],
                "linear",
            )
            consumed.update(chain.nodes)
            note("gemm_epilogue")
            continue
        bmm = _bmm_parts(node)
        if bmm is not None and out_shape is not None:
            n = out_shape[-1]
            chain = _extend(gm, node, consumed, lambda v, n=n: v.numel() == n and v.shape[-1] == n)
            last = chain.nodes[-1] if chain.nodes else node
            args = (*bmm, chain.residual) if chain.residual is not None else bmm
            _install(
                gm, FusedBmm(tuple(chain.ops), chain.vector, precision), node, last, args, [node, *chain.nodes], "bmm"
            )
            consumed.update(chain.nodes)
            note("bmm_epilogue")
            continue
        norm = _norm_parts(gm, node)
        if norm is not None and out_shape is not None:
            mode = norm["mode"]
            if mode == "group":
                ok = lambda v, out_shape=out_shape: _vector_dim(v, out_shape) == 1  # noqa: E731
            else:
                ok = lambda v, out_shape=out_shape: v.shape[-1] == out_shape[-1] and v.numel() == out_shape[-1]  # noqa: E731
            chain = _extend(gm, node, consumed, ok)
            last = chain.nodes[-1] if chain.nodes else node
            args = (node.args[0], chain.residual) if chain.residual is not None else (node.args[0],)
            _install(
                gm,
                FusedNorm(epilogue=tuple(chain.ops), vector=chain.vector, **norm),
                node,
                last,
                args,
                [node, *chain.nodes],
                "norm",
            )
            consumed.update(chain.nodes)
            note("norm")
            continue
        soft = _softmax_parts(gm, node)
        if soft is not None:
            mode, keepdim = soft
            x, scale, dead = node.args[0], 1.0, [node]
            if isinstance(x, fx.Node) and len(x.users) == 1 and x not in consumed:
                found = _pointwise(gm, x, x.args[0]) if x.args and isinstance(x.args[0], fx.Node) else None
                if found and found[1] is None and found[2] is None and [o.name for o in found[0]] == ["mul"]:
                    scale, dead, x = found[0][0].param, [x, node], x.args[0]
            _install(gm, FusedSoftmax(mode, scale, keepdim), node, node, (x,), dead, "softmax")
            note("softmax")
            continue
        if isinstance(node.args[0] if node.args else None, fx.Node) and out_shape is not None:
            x = node.args[0]
            found = _pointwise(gm, node, x)
            if found is None or x in consumed:
                continue
            x_shape = _shape(x)
            ok = lambda v, x_shape=x_shape: x_shape is not None and _vector_dim(v, x_shape) is not None  # noqa: E731
            ops, vector, residual = found
            if vector is not None and not ok(vector):
                continue
            chain = _extend(gm, x, consumed, ok, _Chain(list(ops), [node], vector, residual))
            last = chain.nodes[-1]
            vdim = _vector_dim(chain.vector, x_shape) if chain.vector is not None else 1
            reducer = next(iter(last.users)) if len(last.users) == 1 else None
            red = _reduce_parts(reducer) if reducer is not None and chain.residual is None else None
            if red is not None:
                kind, dim, keepdim = red
                _install(
                    gm,
                    FusedReduce(kind, dim, keepdim, tuple(chain.ops), chain.vector, vdim),
                    node,
                    reducer,
                    (x,),
                    [*chain.nodes, reducer],
                    "reduce",
                )
                consumed.update([*chain.nodes, reducer])
                note("reduce")
            elif len(chain.ops) >= 2:
                args = (x, chain.residual) if chain.residual is not None else (x,)
                _install(
                    gm, PointwiseChain(tuple(chain.ops), chain.vector, vdim), node, last, args, chain.nodes, "pointwise"
                )
                consumed.update(chain.nodes)
                note("pointwise")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return counts


def _softmax_parts(gm, node) -> tuple[str, bool] | None:
    """(mode, keepdim) if `node` is a softmax, log_softmax or logsumexp over the last dim."""
    shape = _shape(node.args[0]) if node.args else None
    if shape is None:
        return None
    last = len(shape) - 1
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)) and mod.dim is not None and mod.dim % len(shape) == last:
            return ("softmax" if isinstance(mod, nn.Softmax) else "log_softmax"), False
        return None
    if node.op == "call_function" and node.target in _ATEN_SOFTMAX:
        dim = _kwarg(node, 1, "dim")
        # softmax.int's dtype / _softmax's half_to_float change the output dtype: not this kernel
        extra = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype", node.kwargs.get("half_to_float"))
        ok = isinstance(dim, int) and dim % len(shape) == last and not extra
        return (_ATEN_SOFTMAX[node.target], False) if ok else None
    if node.op == "call_function" and node.target is aten.logsumexp.default:
        dim = _kwarg(node, 1, "dim")
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        keepdim = bool(_kwarg(node, 2, "keepdim", False))
        return ("logsumexp", keepdim) if isinstance(dim, int) and dim % len(shape) == last else None
    funcs = {
        torch.softmax: "softmax",
        F.softmax: "softmax",
        torch.log_softmax: "log_softmax",
        F.log_softmax: "log_softmax",
    }
    methods = {"softmax": "softmax", "log_softmax": "log_softmax"}
    mode = (
        funcs.get(node.target)
        if node.op == "call_function"
        else methods.get(node.target)
        if node.op == "call_method"
        else None
    )
    if mode is not None:
        dim = _kwarg(node, 1, "dim")
        extra = {k for k in node.kwargs if k != "dim"} | ({"dtype"} if len(node.args) > 2 else set())
        return (mode, False) if isinstance(dim, int) and dim % len(shape) == last and not extra else None
    if (node.op == "call_function" and node.target is torch.logsumexp) or (
        node.op == "call_method" and node.target == "logsumexp"
    ):
        dim = _kwarg(node, 1, "dim")
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        keepdim = bool(_kwarg(node, 2, "keepdim", False))
        return ("logsumexp", keepdim) if isinstance(dim, int) and dim % len(shape) == last else None
    return None


def _reduce_parts(node: fx.Node) -> tuple[str, int, bool] | None:
    if node.op == "call_function" and node.target in _ATEN_REDUCE:
        dim = _kwarg(node, 1, "dim")
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        extra = node.kwargs.get("dtype") or (len(node.args) > 3 and node.args[3] is not None)
        if not isinstance(dim, int) or extra:
            return None
        return _ATEN_REDUCE[node.target], dim, bool(_kwarg(node, 2, "keepdim", False))
    kind = (
        _REDUCE_FUNCS.get(node.target)
        if node.op == "call_function"
        else _REDUCE_METHODS.get(node.target)
        if node.op == "call_method"
        else None
    )
    if kind is None:
        return None
    dim = _kwarg(node, 1, "dim")
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    extra = {k for k in node.kwargs if k not in ("dim", "keepdim")}
    if not isinstance(dim, int) or extra or len(node.args) > 3:
        return None
    return kind, dim, bool(_kwarg(node, 2, "keepdim", False))


def _propagate_shapes(gm: fx.GraphModule, example_inputs: list) -> None:
    """Annotate nodes with shapes: on the meta device (no compute), else on the real inputs. A captured ATen graph
    has them already, unless a rewrite added nodes."""
    if all("tensor_meta" in n.meta or "val" in n.meta for n in gm.graph.nodes if n.op.startswith("call")):
        return
    if gm.meta.get("capture") == EXPORT:  # its graph asserts devices: the meta device fails it
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
        return
    try:
        meta = copy.deepcopy(gm).to("meta")
        ShapeProp(meta).propagate(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs])
        for a, b in zip(meta.graph.nodes, gm.graph.nodes, strict=False):
            if "tensor_meta" in a.meta:
                b.meta["tensor_meta"] = a.meta["tensor_meta"]
    except Exception:  # noqa: BLE001 - an op without a meta kernel: propagate on the real inputs
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)

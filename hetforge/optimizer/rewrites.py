"""Graph rewrites on the captured graph of a module *instance* (its real, loaded weights).

The graph is torch.export's ATen graph where export captures the module, else torch.fx's
(`capture.capture`); every rewrite matches both forms (`aten.linear` with weights as get_attr nodes,
and `call_module(nn.Linear)`).

Each rewrite is generic over graphs, matched on node patterns, never on a problem's name:
  fold_bn         eval-mode BatchNorm after a convolution or linear layer -> folded into its weights
  fold_scale      `layer(x) * c` or `layer(x) / c` for a constant c -> weights and bias scaled
  merge_linear    two consecutive linear layers with nothing between -> one linear layer
  sum_linear      `linear(x).sum(-1)` -> a matrix-vector product with the summed weight rows
  dead_code       computation whose result never reaches the output -> dropped

A folded layer is always a new submodule, so a layer the graph calls in several places keeps its
original weights for the other calls. Every rewritten module is still a candidate: it goes through
the verifier like any other (`variants.rewrite_candidate_source` writes the candidate file for it).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from hetforge.optimizer.capture import TRACE_LOCK, capture

aten = torch.ops.aten
__all__ = ["REWRITES", "apply_rewrites", "rewrite_graph", "symbolic_trace"]

REWRITES: dict[str, Callable[[fx.GraphModule], int]] = {}


def rewrite(name: str):
    def register(fn: Callable[[fx.GraphModule], int]) -> Callable[[fx.GraphModule], int]:
        REWRITES[name] = fn
        return fn

    return register


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _replace_module(gm: fx.GraphModule, node: fx.Node, new: nn.Module, tag: str) -> None:
    """Point `node` at `new`, stored under a fresh name (the old module may serve other calls)."""
    base = f"{str(node.target).replace('.', '_')}_{tag}"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}{i}"
    gm.add_submodule(name, new)
    node.target = name


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _get_attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


_ATEN_LAYERS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def _aten_layer(gm: fx.GraphModule, node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of an `aten.linear` / `aten.convNd` node whose parameters are get_attr nodes."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _ATEN_LAYERS:
        return None
    if node.kwargs or len(node.args) < 2:
        return None
    weight = _get_attr(gm, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _get_attr(gm, bias_node) if bias_node is not None else None
    if weight is None or (bias_node is not None and bias is None):
        return None
    return weight, bias


def _set_params(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None, tag: str) -> None:
    """Point an aten layer `node` at new parameters (new attributes: the old ones may serve other calls)."""
    base = f"hetforge_{tag}"
    i = 0
    while hasattr(gm, f"{base}{i}_weight"):
        i += 1
    gm.register_parameter(f"{base}{i}_weight", nn.Parameter(weight.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(node):
        w_node = gm.graph.get_attr(f"{base}{i}_weight")
        b_node = None
        if bias is not None:
            gm.register_parameter(f"{base}{i}_bias", nn.Parameter(bias.detach().clone(), requires_grad=False))
            b_node = gm.graph.get_attr(f"{base}{i}_bias")
    args = list(node.args)
    old = [a for a in args[1:3] if isinstance(a, fx.Node)]
    args[1] = w_node
    if len(args) > 2:
        args[2] = b_node
    elif b_node is not None:
        args.append(b_node)
    node.args = tuple(args)
    for attr in old:  # the old parameters' reads, unless another call still uses them
        if not attr.users:
            gm.graph.erase_node(attr)


@rewrite("fold_bn")
def fold_bn(gm: fx.GraphModule) -> int:
    """conv/linear -> eval BatchNorm: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.batch_norm.default:
            count += _fold_aten_bn(gm, node)
            continue
        bn = _module(gm, node)
        if (
            not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            or bn.training
            or not bn.track_running_stats
        ):
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or not _single_user(producer):
            continue
        layer = _module(gm, producer)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not layer.training:
            fused = fuse_conv_bn_eval(copy.deepcopy(layer), bn)
        elif isinstance(layer, nn.Linear) and not layer.training and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(copy.deepcopy(layer), bn)
        else:
            continue
        _replace_module(gm, producer, fused, "bnfolded")
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        count += 1
    return count


def _fold_aten_bn(gm: fx.GraphModule, node: fx.Node) -> int:
    """fold_bn on `aten.batch_norm(aten.linear / aten.convNd(...), ..., training=False, ...)`."""
    producer = node.args[0]
    params = _aten_layer(gm, producer)
    if params is None or not _single_user(producer) or len(node.args) < 8 or node.args[5] is not False:
        return 0
    gamma, beta, mean, var = (_get_attr(gm, a) if a is not None else None for a in node.args[1:5])
    if mean is None or var is None or any(a is not None and t is None for a, t in zip(node.args[1:3], (gamma, beta))):
        return 0
    weight, bias = params
    out = producer.meta.get("val")
    # BatchNorm normalizes dim 1: a linear layer's features are dim 1 only on 2-D inputs
    if producer.target is aten.linear.default and (not isinstance(out, torch.Tensor) or out.dim() != 2):
        return 0
    eps = float(node.args[7])
    scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(var.double() + eps)
    shift = (beta.double() if beta is not None else 0.0) - mean.double() * scale
    new_w = (weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    new_b = ((bias.double() * scale if bias is not None else 0.0) + shift).to(weight.dtype)
    _set_params(gm, producer, new_w, new_b, "bnfolded")
    node.replace_all_uses_with(producer)
    gm.graph.erase_node(node)
    for attr in node.args[1:5]:
        if isinstance(attr, fx.Node) and not attr.users:
            gm.graph.erase_node(attr)
    return 1


_SCALE_OPS = {
    operator.mul: False,
    torch.mul: False,
    aten.mul.Tensor: False,
    aten.mul.Scalar: False,
    operator.truediv: True,
    torch.div: True,
    aten.div.Tensor: True,
    aten.div.Scalar: True,
}


@rewrite("fold_scale")
def fold_scale(gm: fx.GraphModule) -> int:
    """`layer(x) * c` (or `/ c`) with c a Python number: scale the layer's weight and bias instead."""
    count = 0
    for node in list(gm.graph.nodes):
        divide = _SCALE_OPS.get(node.target) if node.op == "call_function" else None
        if divide is None or node.kwargs or len(node.args) != 2:
            continue
        a, b = node.args
        layer_node, scale = (a, b) if isinstance(a, fx.Node) else (b, a)
        if divide and layer_node is not a:  # c / layer(x) is not a scale
            continue
        if (
            not isinstance(layer_node, fx.Node)
            or isinstance(scale, (fx.Node, bool))
            or not isinstance(scale, (int, float))
        ):
            continue
        factor = 1.0 / scale if divide else float(scale)
        if factor == 0.0 or factor != factor:
            continue
        # relu(z) * c == relu(z * c) for c > 0: a positive scale passes back through ReLUs.
        while (
            factor > 0
            and _is_relu(gm, layer_node)
            and _single_user(layer_node)
            and isinstance(layer_node.args[0], fx.Node)
        ):
            layer_node = layer_node.args[0]
        if not _single_user(layer_node):
            continue
        layer, params = _module(gm, layer_node), _aten_layer(gm, layer_node)
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            folded = copy.deepcopy(layer)
            with torch.no_grad():
                folded.weight.mul_(factor)
                if folded.bias is not None:
                    folded.bias.mul_(factor)
            _replace_module(gm, layer_node, folded, "scaled")
        elif params is not None:
            weight, bias = params
            _set_params(gm, layer_node, weight * factor, bias * factor if bias is not None else None, "scaled")
        else:
            continue
        node.replace_all_uses_with(node.args[0] if node.args[0] is not scale else node.args[1])
        gm.graph.erase_node(node)
        count += 1
    return count


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        relus = (torch.relu, torch.nn.functional.relu, aten.relu.default)
        return node.target in relus and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu"
    return isinstance(_module(gm, node), nn.ReLU)


@rewrite("merge_linear")
def merge_linear(gm: fx.GraphModule) -> int:
    """linear2(linear1(x)) -> one linear: W = W2 W1, b = W2 b1 + b2 (only when it saves FLOPs)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.linear.default:
            count += _merge_aten_linear(gm, node)
            continue
        second = _module(gm, node)
        if not isinstance(second, nn.Linear):
            continue
        producer = node.args[0]
        first = _module(gm, producer) if isinstance(producer, fx.Node) else None
        if not isinstance(first, nn.Linear) or not _single_user(producer):
            continue
        # x W1^T W2^T costs in*mid + mid*out per row; the merged map costs in*out: merge only if cheaper.
        if (
            first.in_features * second.out_features
            >= first.in_features * first.out_features + first.out_features * second.out_features
        ):
            continue
        merged = nn.Linear(
            first.in_features, second.out_features, bias=first.bias is not None or second.bias is not None
        )
        merged = merged.to(device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            w, b = _merged(first.weight, first.bias, second.weight, second.bias)
            merged.weight.copy_(w)
            if merged.bias is not None:
                merged.bias.copy_(b)
        node.args = (producer.args[0],) + tuple(node.args[1:])
        _replace_module(gm, node, merged, "merged")
        gm.graph.erase_node(producer)
        count += 1
    return count


def _merged(w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W = W2 W1, b = W2 b1 + b2, in float64 then back to the weights' dtype."""
    w = w2.double() @ w1.double()
    if b1 is None and b2 is None:
        return w.to(w1.dtype), None
    b = torch.zeros(w2.shape[0], dtype=torch.float64, device=w.device)
    if b1 is not None:
        b += w2.double() @ b1.double()
    if b2 is not None:
        b += b2.double()
    return w.to(w1.dtype), b.to(w1.dtype)


def _merge_aten_linear(gm: fx.GraphModule, node: fx.Node) -> int:
    """merge_linear on `aten.linear(aten.linear(x, w1, b1), w2, b2)`."""
    producer = node.args[0]
    second = _aten_layer(gm, node)
    first = _aten_layer(gm, producer) if isinstance(producer, fx.Node) else None
    if second is None or first is None or producer.target is not aten.linear.default or not _single_user(producer):
        return 0
    (w1, b1), (w2, b2) = first, second
    n_in, n_mid, n_out = w1.shape[1], w1.shape[0], w2.shape[0]
    if n_in * n_out >= n_in * n_mid + n_mid * n_out:  # as for modules: merge only if it saves FLOPs
        return 0
    w, b = _merged(w1, b1, w2, b2)
    _set_params(gm, node, w, b, "merged")
    node.args = (producer.args[0], *node.args[1:])
    gm.graph.erase_node(producer)
    return 1


@rewrite("sum_linear")
def sum_linear(gm: fx.GraphModule) -> int:
    """`linear(x).sum(-1)` = x @ W.sum(0) + b.sum(): a matrix-vector product instead of a matrix product."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.sum.dim_IntList:
            count += _sum_aten_linear(gm, node)
            continue
        is_sum = (node.op == "call_method" and node.target == "sum") or (
            node.op == "call_function" and node.target is torch.sum
        )
        if not is_sum or not isinstance(node.args[0], fx.Node):
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dim not in (-1, (-1,), [-1]) or set(node.kwargs) - {"dim", "keepdim"}:
            continue
        producer = node.args[0]
        layer = _module(gm, producer)
        if not isinstance(layer, nn.Linear) or not _single_user(producer):
            continue
        summed = nn.Linear(layer.in_features, 1, bias=layer.bias is not None).to(
            layer.weight.device, layer.weight.dtype
        )
        with torch.no_grad():
            summed.weight.copy_(layer.weight.double().sum(0, keepdim=True))
            if layer.bias is not None:
                summed.bias.copy_(layer.bias.double().sum().reshape(1))
        _replace_module(gm, producer, summed, "rowsum")
        with gm.graph.inserting_after(producer):
            squeezed = producer if keepdim else gm.graph.call_method("squeeze", (producer, -1))
        node.replace_all_uses_with(squeezed)
        gm.graph.erase_node(node)
        count += 1
    return count


def _sum_aten_linear(gm: fx.GraphModule, node: fx.Node) -> int:
    """sum_linear on `aten.sum.dim_IntList(aten.linear(x, w, b), [-1], keepdim)`."""
    producer = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    params = _aten_layer(gm, producer)
    if (
        params is None
        or producer.target is not aten.linear.default
        or list(dim or ()) != [-1]
        or set(node.kwargs) - {"keepdim"}
        or len(node.args) > 3
        or not _single_user(producer)
    ):
        return 0
    w, b = params
    _set_params(
        gm,
        producer,
        w.double().sum(0, keepdim=True).to(w.dtype),
        b.double().sum().reshape(1).to(b.dtype) if b is not None else None,
        "rowsum",
    )
    with gm.graph.inserting_after(producer):
        squeezed = producer if keepdim else gm.graph.call_function(aten.squeeze.dim, (producer, -1))
    node.replace_all_uses_with(squeezed)
    gm.graph.erase_node(node)
    return 1


@rewrite("dead_code")
def dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes whose results never reach the output (fx's own pass; impure calls stay). Counts computations:
    parameter reads other rewrites left unused are dropped too, but are no finding of their own."""

    def computations() -> int:
        return sum(n.op != "get_attr" for n in gm.graph.nodes)

    before = computations()
    gm.graph.eliminate_dead_code()
    return before - computations()


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace of an eval-mode copy of `module`, holding TRACE_LOCK."""
    with TRACE_LOCK:
        return fx.symbolic_trace(copy.deepcopy(module).eval())


def apply_rewrites(
    module: nn.Module, names: list[str] | None = None, example_inputs: list | None = None
) -> tuple[fx.GraphModule, dict[str, int]] | None:
    """The rewritten copy of `module` and how often each rewrite fired; None if it cannot be captured.

    With `example_inputs`, the graph is torch.export's (specialized to those inputs), else torch.fx's."""
    _check_names(names)
    try:
        gm = capture(module, example_inputs) if example_inputs is not None else symbolic_trace(module)
    except Exception:  # noqa: BLE001 - CaptureError, or fx's own errors on data-dependent control flow
        return None
    return gm, rewrite_graph(gm, names)


def _check_names(names: list[str] | None) -> None:
    unknown = [n for n in names or [] if n not in REWRITES]
    if unknown:
        raise ValueError(f'Got "{", ".join(unknown)}" for rewrites: any of {", ".join(REWRITES)}.')


def rewrite_graph(gm: fx.GraphModule, names: list[str] | None = None) -> dict[str, int]:
    """Apply `names` (default: every rewrite) to `gm` in place; how often each fired."""
    _check_names(names)
    applied = {}
    for name in names or list(REWRITES):
        fired = REWRITES[name](gm)
        if fired:
            applied[name] = fired
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return applied

"""Graph rewrites on torch.fx graphs of a module *instance* (its real, loaded weights).

Each rewrite is generic over graphs, matched on node patterns, never on a problem's name:
  fold_bn         eval-mode BatchNorm after a convolution or linear layer -> folded into its weights
  fold_scale      `layer(x) * c` or `layer(x) / c` for a constant c -> weights and bias scaled
  merge_linear    two consecutive linear layers with nothing between -> one linear layer
  sum_linear      `linear(x).sum(-1)` -> a matrix-vector product with the summed weight rows
  dead_code       computation whose result never reaches the output -> dropped

A folded layer is always a new submodule, so a layer the graph calls in several places keeps its
original weights for the other calls. Every rewritten module is still a candidate: it goes through
the verifier like any other (`rewrite_candidate_source` writes the candidate file for it).
"""

from __future__ import annotations

import copy
import operator
import threading
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from hetforge.core.problem import load_module_file

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


@rewrite("fold_bn")
def fold_bn(gm: fx.GraphModule) -> int:
    """conv/linear -> eval BatchNorm: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    count = 0
    for node in list(gm.graph.nodes):
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


_SCALE_OPS = {operator.mul: False, torch.mul: False, operator.truediv: True, torch.div: True}


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
        layer = _module(gm, layer_node)
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not _single_user(layer_node):
            continue
        folded = copy.deepcopy(layer)
        with torch.no_grad():
            folded.weight.mul_(factor)
            if folded.bias is not None:
                folded.bias.mul_(factor)
        _replace_module(gm, layer_node, folded, "scaled")
        node.replace_all_uses_with(node.args[0] if node.args[0] is not scale else node.args[1])
        gm.graph.erase_node(node)
        count += 1
    return count


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu) and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu"
    return isinstance(_module(gm, node), nn.ReLU)


@rewrite("merge_linear")
def merge_linear(gm: fx.GraphModule) -> int:
    """linear2(linear1(x)) -> one linear: W = W2 W1, b = W2 b1 + b2 (only when it saves FLOPs)."""
    count = 0
    for node in list(gm.graph.nodes):
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
            w = second.weight.double() @ first.weight.double()
            b = torch.zeros(second.out_features, dtype=torch.float64, device=w.device)
            if first.bias is not None:
                b += second.weight.double() @ first.bias.double()
            if second.bias is not None:
                b += second.bias.double()
            merged.weight.copy_(w)
            if merged.bias is not None:
                merged.bias.copy_(b)
        node.args = (producer.args[0],) + tuple(node.args[1:])
        _replace_module(gm, node, merged, "merged")
        gm.graph.erase_node(producer)
        count += 1
    return count


@rewrite("sum_linear")
def sum_linear(gm: fx.GraphModule) -> int:
    """`linear(x).sum(-1)` = x @ W.sum(0) + b.sum(): a matrix-vector product instead of a matrix product."""
    count = 0
    for node in list(gm.graph.nodes):
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


@rewrite("dead_code")
def dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes whose results never reach the output (fx's own pass; impure calls stay)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)


# torch.fx's symbolic tracing patches torch.nn.Module.__call__ for the whole process while it runs: a module called
# from another thread meanwhile goes through the tracer and fails ("module is not installed as a submodule"). Serving
# replicas build variants (which traces) while they serve, so tracing and their forward calls share this lock.
TRACE_LOCK = threading.Lock()


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace of an eval-mode copy of `module`, holding TRACE_LOCK."""
    with TRACE_LOCK:
        return fx.symbolic_trace(copy.deepcopy(module).eval())


def apply_rewrites(module: nn.Module, names: list[str] | None = None) -> tuple[fx.GraphModule, dict[str, int]] | None:
    """The rewritten copy of `module` and how often each rewrite fired; None if it cannot be traced."""
    unknown = [n for n in names or [] if n not in REWRITES]
    if unknown:
        raise ValueError(f'Got "{", ".join(unknown)}" for rewrites: any of {", ".join(REWRITES)}.')
    try:
        gm = symbolic_trace(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: fx cannot trace every module
        return None
    applied = {}
    for name in names or list(REWRITES):
        fired = REWRITES[name](gm)
        if fired:
            applied[name] = fired
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, applied


def rewritten_model_class(reference_file: str, names: list[str]) -> type:
    """A ModelNew class for the verifier: builds the reference Model, then rewrites that instance."""
    reference = load_module_file(reference_file)

    class ModelNew(nn.Module):
        def __new__(cls, *args, **kwargs):
            result = apply_rewrites(reference.Model(*args, **kwargs), names)
            if result is None:
                raise TypeError(f"{reference_file}: Model cannot be traced by torch.fx")
            return result[0]

    return ModelNew


def rewrite_candidate_source(reference_file: str, names: list[str]) -> str:
    """The text of a candidate file applying `names` to the reference in `reference_file`."""
    return (
        '"""Generated by hetforge: graph rewrites of the reference, built from its own instance."""\n\n'
        "from hetforge.optimizer.rewrites import rewritten_model_class\n\n"
        f"ModelNew = rewritten_model_class({reference_file!r}, {names!r})\n"
    )

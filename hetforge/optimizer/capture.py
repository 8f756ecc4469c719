"""Graph capture of a stage's own instance, for the agents that transform graphs (rewrites, library).

torch.export (non-strict) first: it runs the module's Python as is, so HuggingFace models with their
config-driven branches, `*args` forwards and output dataclasses capture, and the result is an fx
GraphModule at the ATen level (`aten.linear`, `aten.layer_norm`, `aten.gelu`, ...) with parameters as
`get_attr` nodes. torch.fx symbolic tracing is the fallback (it keeps `call_module` nodes, which the
matchers also read). Where both fail, `CaptureError` names the operation or the exception that broke
capture and where in the model's code it happened.

An exported graph is specialized to its example inputs' shapes and device (it bakes `arange(...,
device=cpu)` and views of fixed sizes), so `PerSignature` keeps one transformed graph per input
signature and builds a new one from the untouched instance the first time it sees another signature
(a serving bucket, a verifier input variant, the move to CUDA).
"""

from __future__ import annotations

import copy
import re
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

# torch.fx's symbolic tracing patches torch.nn.Module.__call__ for the whole process while it runs: a module called
# from another thread meanwhile goes through the tracer and fails ("module is not installed as a submodule"). Serving
# replicas build variants (which traces) while they serve, so tracing and their forward calls share this lock. It is
# re-entrant: a `PerSignature` variant captures inside a forward call that holds it.
TRACE_LOCK = threading.RLock()

EXPORT, FX = "torch.export", "torch.fx"
MAX_SIGNATURES = 16  # graphs kept per variant: each holds its own transformed weights
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_OWN_DIR = str(Path(__file__).resolve().parent)


class CaptureError(Exception):
    """Neither torch.export nor torch.fx captured the module: the message says why, one line per method."""


def capture(module: nn.Module, example_inputs: list) -> fx.GraphModule:
    """A graph of an eval-mode copy of `module`: torch.export's ATen graph, else torch.fx's; `gm.meta["capture"]`
    says which. Raises CaptureError naming what broke both."""
    model = copy.deepcopy(module).eval()
    try:
        return _export(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - any export failure is reported; fx is tried next
        export_error = describe_export_error(err)
    try:
        with TRACE_LOCK:
            gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - data-dependent control flow etc.: fx cannot trace every module
        raise CaptureError(f"{export_error}; {FX}: {_first_line(err)}") from None
    gm.meta["capture"] = FX
    gm.meta["export_error"] = export_error
    return gm


def _export(model: nn.Module, example_inputs: list) -> fx.GraphModule:
    args = tuple(_plain(x) for x in example_inputs)
    with TRACE_LOCK, torch.inference_mode(False), torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
    gm = ep.module()
    gm.meta["capture"] = EXPORT
    # ep.module() checks every call's inputs against the export's shapes (two forward pre-hooks and a guards
    # call in the graph): 70 us a call on the CPU for a 5-GEMM head at batch 1, half its eager time. A graph
    # here only ever sees the signature it was captured for (`PerSignature`), so the checks go; the
    # remaining hooks only enter and leave module-typed graph inputs, which these graphs do not have.
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
        elif node.op == "get_attr" and not node.users:  # buffers the graph never reads (num_batches_tracked)
            gm.graph.erase_node(node)
    gm.recompile()
    for node in gm.graph.nodes:  # the matchers read shapes from tensor_meta, as ShapeProp writes them
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and "tensor_meta" not in node.meta:
            node.meta["tensor_meta"] = _Meta(tuple(val.shape), val.dtype)
    return gm


class _Meta:
    """The part of ShapeProp's TensorMetadata the matchers read."""

    def __init__(self, shape: tuple, dtype: torch.dtype):
        self.shape, self.dtype = torch.Size(shape), dtype


def _plain(x):
    """An input export can take: inference-mode tensors (serving's) are cloned outside inference mode."""
    if isinstance(x, torch.Tensor) and x.is_inference():
        with torch.inference_mode(False):
            return x.clone()
    return x


def describe_export_error(err: BaseException) -> str:
    """One line: what broke torch.export and where in the model's code, e.g. `torch.export: data-dependent
    control flow at modeling_bert.py:123 (aten._local_scalar_dense)`."""
    text = str(err)
    name = type(err).__name__
    if "DataDependent" in name or "data-dependent" in text or "data dependent" in text:
        what = "data-dependent control flow"
    elif "Unsupported" in name:
        what = "unsupported Python: " + _first_line(err, with_type=False)
    else:
        what = _first_line(err)
    where, line = _user_frame(err)
    ops = sorted(set(re.findall(r"aten\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?", text)))[:3]
    if not ops:  # the message names no operator: the user's line shows which read a tensor's value
        ops = sorted({op for call, op in _VALUE_READS.items() if call in line})
    return f"{EXPORT}: {what}" + (f" at {where}" if where else "") + (f" ({', '.join(ops)})" if ops else "")


# Calls in a model's line that read tensor values on the host, and the ATen operator export fails on.
_VALUE_READS = {
    ".item()": "aten._local_scalar_dense",
    ".tolist()": "aten._local_scalar_dense",
    "nonzero": "aten.nonzero",
    "masked_select": "aten.masked_select",
    "unique": "aten._unique2",
}


def _user_frame(err: BaseException) -> tuple[str, str]:
    """(FILE:LINE, the line's text) of the innermost frame in the model's own code (not torch, not this package)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith((_TORCH_DIR, _OWN_DIR))]
    if not frames:
        return "", ""
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}", frames[-1].line or ""


def _first_line(err: BaseException, with_type: bool = True) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    line = lines[0][:200] if lines else ""
    return f"{type(err).__name__}: {line}" if with_type else line


def signature(inputs) -> tuple:
    """What an exported graph is specialized to: shapes, dtypes and devices of the tensors, other values' reprs."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("value", repr(x)) for x in inputs
    )


class PerSignature(nn.Module):
    """One transformed graph per input signature, each built from the untouched instance `source`.

    `build(source, inputs)` returns the transformed module for those inputs (it captures `source` with them).
    The first graph is built eagerly from `example_inputs`, so a module that cannot be transformed fails when the
    variant is built, not on its first call.
    """

    def __init__(self, source: nn.Module, build: Callable[[nn.Module, list], nn.Module], example_inputs: list):
        super().__init__()
        self.source = source
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_graphs", {})
        self._graph_for(list(example_inputs))

    def _graph_for(self, inputs: list) -> nn.Module:
        key = signature(inputs)
        graph = self._graphs.get(key)
        if graph is None:
            device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
            stale = [k for k in self._graphs if any(d[2] != device for d in k if d[0] != "value")]
            for k in stale:  # graphs of another device (built before a .to()) are dead weight
                del self._graphs[k]
            if len(self._graphs) >= MAX_SIGNATURES:
                self._graphs.pop(next(iter(self._graphs)))
            graph = self._graphs[key] = self._build(self.source, inputs)
        return graph

    def forward(self, *inputs):
        return self._graph_for(list(inputs))(*inputs)

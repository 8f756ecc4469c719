"""Variants built from a stage's own module instance: what serving swaps in.

A *transform* variant is a recipe of steps applied to an instance: graph rewrites, then library
kernels, then a compiler recipe. Folding weights happens when it is built, from the instance it is
given, so a module whose weights came from a checkpoint gets a variant with those weights folded
in (and the verifier compares it against that same instance). A *module* variant (an LLM agent's
`ModelNew`) must keep the reference's parameter names: it is built with the same constructor
arguments and loaded with the instance's `state_dict()`.

The registry stores the `VariantSpec` (as JSON) next to the candidate source, so both kinds can be
rebuilt on any replica from the registry alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from hetforge.optimizer.capture import CaptureError, PerSignature, capture
from hetforge.optimizer.library import fuse_graph
from hetforge.optimizer.recipes import Recipe, RecipeModule
from hetforge.optimizer.reference import describe, load_reference, reference_doc
from hetforge.optimizer.rewrites import rewrite_graph


class VariantError(Exception):
    """A variant cannot be built from this instance (no graph captured, state dict mismatch, ...)."""


@dataclass(frozen=True)
class VariantSpec:
    """How to build a transform variant from an instance."""

    rewrites: tuple[str, ...] = ()
    library: bool = False
    recipe: dict | None = None  # a hetforge.optimizer.recipes.Recipe as a dict; None: eager
    precision: str = "strict"

    def to_json(self) -> dict:
        return {
            "kind": "transform",
            "rewrites": list(self.rewrites),
            "library": self.library,
            "recipe": self.recipe,
            "precision": str(self.precision),  # a plain string: candidate sources embed this dict as Python
        }

    @classmethod
    def from_json(cls, doc: dict) -> VariantSpec:
        if doc.get("kind") != "transform":
            raise VariantError(f'Got "{doc.get("kind")}" for a variant spec kind: transform')
        return cls(
            tuple(doc.get("rewrites") or ()),
            bool(doc.get("library")),
            doc.get("recipe"),
            doc.get("precision", "strict"),
        )

    def label(self) -> str:
        parts = (
            [*self.rewrites] + (["library"] if self.library else []) + ([self.recipe["name"]] if self.recipe else [])
        )
        return "+".join(parts) or "eager"


def build_variant(instance: nn.Module, spec: VariantSpec, example_inputs: list) -> nn.Module:
    """The variant of `instance` (left untouched) that `spec` describes.

    Rewrites and library kernels transform a captured graph, one per input signature (`PerSignature`: an
    exported graph is specialized to its inputs' shapes and device), the first from `example_inputs`."""
    model = copy.deepcopy(instance).eval()
    if spec.rewrites or spec.library:
        try:
            model = PerSignature(model, lambda source, inputs: transform_graph(source, inputs, spec), example_inputs)
        except CaptureError as err:
            raise VariantError(f"{type(instance).__name__}: no graph to transform: {err}") from None
    if spec.recipe:
        model = RecipeModule(model, Recipe(**spec.recipe))
    return model


def transform_graph(source: nn.Module, inputs: list, spec: VariantSpec) -> nn.Module:
    """The graph of `source` captured on `inputs`, with `spec`'s rewrites, then its library kernels."""
    gm = capture(source, inputs)
    if spec.rewrites:
        rewrite_graph(gm, list(spec.rewrites))
    if spec.library:
        fuse_graph(gm, inputs, spec.precision)
    return gm


def build_module_variant(
    source_module, instance: nn.Module, init_args: tuple = (), init_kwargs: dict | None = None
) -> nn.Module:
    """An agent's ModelNew from `source_module`, loaded with the instance's weights (names must match)."""
    model = source_module.ModelNew(*init_args, **(init_kwargs or {}))
    try:
        model.load_state_dict(instance.state_dict(), strict=True)
    except RuntimeError as err:
        raise VariantError(f"ModelNew cannot take the instance's weights: {str(err).splitlines()[0]}") from None
    device = next((p.device for p in instance.parameters()), torch.device("cpu"))
    return model.to(device).eval()


def variant_model_class(reference: str | dict, spec: dict) -> type:
    """A ModelNew class for the verifier: builds the reference's instance (a problem file's path, or any Problem's
    JSON: its checkpoint or pretrained weights loaded), then the variant of that instance."""
    loaded = load_reference(reference)
    parsed = VariantSpec.from_json(spec)

    class ModelNew(nn.Module):
        def __new__(cls, *args, **kwargs):
            instance = loaded.model_class(*args, **kwargs)
            with torch.random.fork_rng():  # example inputs must not shift the caller's random stream
                inputs = loaded.get_inputs()
            return build_variant(instance, parsed, inputs)

    return ModelNew


def variant_candidate_source(reference, spec: VariantSpec) -> str:
    """The text of a candidate file building `spec`'s variant of `reference` (a Problem, its JSON or a problem
    file's path)."""
    return (
        f'"""Generated by hetforge: variant {spec.label()} of {describe(reference)}, built from its own '
        'instance."""\n\n'
        "from hetforge.optimizer.variants import variant_model_class\n\n"
        f"ModelNew = variant_model_class({reference_doc(reference)!r}, {spec.to_json()!r})\n"
    )


def rewrite_candidate_source(reference, names: list[str], precision: str = "strict") -> str:
    """The text of a candidate file applying the rewrites `names` to `reference`'s instance."""
    return variant_candidate_source(reference, VariantSpec(rewrites=tuple(names), precision=precision))

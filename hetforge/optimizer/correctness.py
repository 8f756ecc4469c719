"""Correctness: trials on fresh inputs, every output compared in the judge's process, input checks.

`Correctness` is the judge's correctness step (`judge._Judge` mixes it in): it uses the judge's
options (`opt`), reference side (`side`), candidate worker (`cand_worker`), verdict, seeds
(`used_seeds`, `model_seed`) and its `_ask` and `_reject`. The comparison itself
(`compare_outputs`) is a plain function that returns a typed Reason on failure.
"""

from __future__ import annotations

from typing import Any

import torch

from hetforge.core.tolerance import compare
from hetforge.optimizer import verdict as V


class Correctness:
    """Trials, the rebuild under another seed, the float64 second opinion and the sensitivity flag."""

    def _correctness(self) -> bool:
        first_outputs: list[tuple[Any, Any]] = []
        seeds = self.side.seeds(self.opt.trials + 1)  # the batch's: each reference output is computed once
        self.used_seeds.update(seeds)
        for trial, seed in enumerate(seeds[:-1]):
            worst_abs = worst_rel = 0.0
            for k in range(self.side.input_sets):
                label = f"trial {trial + 1} (seed {seed}), input set {k}"
                result = self._compare_call(self.opt.seed, seed, k, label)
                if result is None:
                    self.verdict.trials.append(V.TrialResult(seed, float("inf"), float("inf"), False))
                    return False
                ref_out, cand_out, max_abs, max_rel = result
                worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
                if k == 0:
                    first_outputs.append((ref_out, cand_out))
            self.verdict.trials.append(V.TrialResult(seed, worst_abs, worst_rel, True))
        flag = insensitive_flag(first_outputs)
        if flag:
            self.verdict.flags.append(flag)
        if not self._beyond_the_draw(seeds[0], first_outputs[0][0]):
            return False
        # Rebuild the candidate under another seed (the reference keeps a module under each): a candidate that
        # hard-codes the first seed's weights fails here.
        other = self.opt.seed + 1
        if self._ask(self.cand_worker, {"cmd": "build", "seed": other}, False, f"rebuild under seed {other}") is None:
            return False
        self.model_seed = other  # timed as rebuilt, against the reference's module under the same seed
        if self._compare_call(other, seeds[-1], 0, f"model re-initialized under seed {other}") is None:
            return False
        return True

    def _beyond_the_draw(self, seed: int, drawn: Any) -> bool:
        """The main input set under `seed`, moved outside the problem's own distribution (`BEYOND_THE_DRAW`), through
        both modules: a candidate that exploits the draw (drops a ReLU on inputs drawn non-negative) fails here.
        Checked wherever the reference's output stays finite; a move that makes it overflow or NaN (where its output
        on the draw itself, `drawn`, had none) is skipped and noted."""
        checked, skipped = [], []
        for kind in BEYOND_THE_DRAW:
            label = f"inputs beyond the problem's draw ({kind}: {BEYOND_THE_DRAW[kind]}), seed {seed}"
            call = self._run_call(seed, 0, kind)
            ref = self.side.ask({**call, "model_seed": self.opt.seed}, self._timeout(self.opt.timeout_s), keep=True)
            if not isinstance(ref, dict) or "error" in ref:
                skipped.append(f"{kind} (the reference fails there)")
                continue
            if nonfinite_count(ref["outputs"]) > nonfinite_count(drawn):
                skipped.append(f"{kind} (the reference's output is not finite there)")
                continue
            if self._compare_call(self.opt.seed, seed, 0, label, transform=kind) is None:
                return False
            checked.append(kind)
        note = "inputs beyond the draw: " + (f"checked {', '.join(checked)}" if checked else "none checked")
        self.verdict.notes.append(note + (f"; skipped {', '.join(skipped)}" if skipped else ""))
        return True

    def _run_call(self, seed: int, k: int, transform: str | None = None) -> dict:
        call = {"cmd": "run", "seed": seed, "set": k}
        if transform:
            call["transform"] = transform
        if (
            self.opt.fetch_sample
        ):  # trusted candidates: positions fixed per seed, so the batch shares the reference's reply
            call["sample"] = {"seed": seed, "count": self.opt.fetch_sample, "above": self.opt.check_sample_above}
        return call

    def _compare_call(
        self, model_seed: int, seed: int, k: int, label: str, transform: str | None = None
    ) -> tuple[Any, Any, float, float] | None:
        """Input set `k` made under `seed` (moved by `transform`, one of BEYOND_THE_DRAW) through both modules (the
        reference's built under `model_seed`)."""
        call = self._run_call(seed, k, transform)
        ref = self._ask(self.side, {**call, "model_seed": model_seed}, True, label, keep=True)
        if ref is None:
            return None
        # the candidate's replies may carry what the reference's do (with room for a wrong dtype), never a frame's claim
        self.cand_worker.output_bytes = max(self.cand_worker.output_bytes or 0, tensor_bytes(ref["outputs"]))
        cand = self._ask(self.cand_worker, call, False, label)
        if cand is None:
            return None
        if cand.get("inputs_modified"):
            # Stages share tensors inside a pipeline: writing into an input corrupts another stage's data.
            self._reject(
                V.RejectKind.MODIFIES_INPUTS, f"{label}: the candidate modified input(s) {cand['inputs_modified']}"
            )
            return None
        outcome = self._check_outputs(cand.get("outputs"), cand.get("info", []), ref["outputs"], label)
        if outcome is None:
            outcome = self._against_float64(
                {**call, "model_seed": model_seed, "float64": True}, cand.get("outputs"), cand.get("info", []), label
            )
        if outcome is None:
            return None
        return ref["outputs"], cand["outputs"], outcome[0], outcome[1]

    def _check_outputs(self, cand: Any, info: list, ref: Any, label: str) -> tuple[float, float] | None:
        """`compare_outputs`, its failure recorded as the verdict's reason."""
        outcome = compare_outputs(cand, info, ref, label, self.opt.device, self.opt.precision)
        if isinstance(outcome, V.Reason):
            self._reject(outcome.kind, outcome.message)
            return None
        return outcome

    def _against_float64(self, request: dict, cand: Any, info: list, label: str) -> tuple[float, float] | None:
        """After a value mismatch with the float32 reference: the same inputs through the reference in float64.
        A candidate within tolerance of that is right where the reference's own rounding was not (a re-expressed
        sum, a more exact product: outputs of magnitude 30 from K = 1024 products differ from the exact result by
        ~1e-4 in cuBLAS fp32 itself). The candidate cannot touch this run: it is the trusted reference worker's."""
        if not self.verdict.reasons or self.verdict.reasons[-1].kind != V.RejectKind.MISMATCH:
            return None
        mismatch = self.verdict.reasons.pop()
        exact = self.side.ask(request, self._timeout(self.opt.timeout_s), keep=request["cmd"] == "run")
        if isinstance(exact, dict) and "error" not in exact:
            truth = cast_like(exact["outputs"], cand)
            outcome = self._check_outputs(cand, info, truth, f"{label} (against the reference in float64)")
            if outcome is not None:
                self.verdict.notes.append(f"more exact than the float32 reference: {label}: {mismatch.message[:200]}")
                return outcome
            self.verdict.reasons.pop()
        self.verdict.reasons.append(mismatch)
        return None


def compare_outputs(
    cand: Any, info: list, ref: Any, label: str, device: str, precision: str
) -> tuple[float, float] | V.Reason:
    """(worst abs error, worst rel error) over all outputs, or why the candidate's outputs are wrong."""
    ref_flat, cand_flat = flatten(ref), flatten(cand)
    if len(ref_flat) != len(cand_flat):
        return V.Reason(V.RejectKind.SHAPE, f"{label}: {len(cand_flat)} outputs, the reference has {len(ref_flat)}")
    for i, item in enumerate(info if isinstance(info, list) else []):
        # Only plain, materialized tensors on the right device: subclasses and lazy objects can defer or fake work.
        if isinstance(item, dict) and not (
            item.get("plain")
            and item.get("layout") == "torch.strided"
            and not item.get("meta")
            and item.get("device") == device
        ):
            return V.Reason(
                V.RejectKind.NOT_PLAIN,
                f"{label}: output {i} is {item.get('type')} on {item.get('device')}, not a plain strided tensor on {device}",
            )
    worst_abs = worst_rel = 0.0
    for i, (c, r) in enumerate(zip(cand_flat, ref_flat, strict=True)):
        if isinstance(r, dict) and "sampled" in r:  # a timed output checked at drawn positions (fetch_sample)
            if not (isinstance(c, dict) and isinstance(c.get("sampled"), torch.Tensor)):
                return V.Reason(
                    V.RejectKind.NOT_PLAIN, f"{label}: output {i} did not come back as the sample asked for"
                )
            if list(c.get("shape", [])) != list(r["shape"]):
                return V.Reason(
                    V.RejectKind.SHAPE, f"{label}: output {i}: shape {tuple(c.get('shape', []))} != {tuple(r['shape'])}"
                )
            c, r = c["sampled"], r["sampled"]
        if not isinstance(r, torch.Tensor):
            if c != r:
                return V.Reason(V.RejectKind.MISMATCH, f"{label}: output {i} is {c!r}, the reference gives {r!r}")
            continue
        if not isinstance(c, torch.Tensor):
            return V.Reason(V.RejectKind.NOT_PLAIN, f"{label}: output {i} is not a tensor ({str(c)[:80]})")
        result = compare(c, r, precision)
        if not result.ok:
            return V.Reason(_FAILURE_KINDS[result.kind], f"{label}: output {i}: {result.reason}")
        worst_abs, worst_rel = max(worst_abs, result.max_abs), max(worst_rel, result.max_rel)
    return worst_abs, worst_rel


# How inputs leave the problem's own draw (floating tensors only; integer and boolean inputs are indices and masks):
# the same move on both sides, from the call's seed, so both modules get identical values.
BEYOND_THE_DRAW = {
    "signs": "each element's sign flipped with probability 1/2",
    # 4x, not more: the error of a bf16 or tf32 candidate grows with its inputs, the tolerance with its outputs
    "scaled": "every element times 4, exact in binary floating point",
    "special": "one element in eight replaced by 0, -0, +-1 or +-2",
}
_SPECIAL = (0.0, -0.0, 1.0, -1.0, 2.0, -2.0)


def beyond_the_draw(inputs: list, kind: str, seed: int) -> list:
    """`inputs` moved outside their distribution as `BEYOND_THE_DRAW[kind]` says (new tensors; inputs untouched)."""
    if kind not in BEYOND_THE_DRAW:
        raise ValueError(f'Got "{kind}" for an input transform: one of {", ".join(BEYOND_THE_DRAW)}.')
    generator = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            out.append(x)
            continue
        if kind == "scaled":
            y = x * 4
        elif kind == "signs":
            flip = (torch.rand(x.shape, generator=generator) < 0.5).to(x.device)
            y = torch.where(flip, -x, x)
        else:
            pick = (torch.rand(x.shape, generator=generator) < 0.125).to(x.device)
            which = torch.randint(len(_SPECIAL), x.shape, generator=generator)
            y = torch.where(pick, torch.tensor(_SPECIAL, dtype=x.dtype)[which].to(x.device), x)
        out.append(y.contiguous())
    return out


def nonfinite_count(value: Any) -> int:
    """NaN and infinite elements in a reply's outputs (nested lists, sampled outputs)."""
    if isinstance(value, torch.Tensor):
        return int((~torch.isfinite(value)).sum()) if value.is_floating_point() or value.is_complex() else 0
    if isinstance(value, dict):
        return sum(nonfinite_count(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nonfinite_count(v) for v in value)
    return 0


_FAILURE_KINDS = {
    "shape": V.RejectKind.SHAPE,
    "dtype": V.RejectKind.DTYPE,
    "nan": V.RejectKind.NAN_INF,
    "inf": V.RejectKind.NAN_INF,
    "values": V.RejectKind.MISMATCH,
}


def insensitive_flag(outputs: list[tuple[Any, Any]]) -> str | None:
    """The flag for a candidate whose output did not change although its inputs did (None if it changed).
    `outputs`: (reference output, candidate output) of the first input set of two or more trials."""
    if len(outputs) < 2:
        return None
    (ref_a, cand_a), (ref_b, cand_b) = outputs[0], outputs[1]

    def same(x: Any, y: Any) -> bool:
        return all(
            isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor) and p.shape == q.shape and torch.equal(p, q)
            for p, q in zip(flatten(x), flatten(y), strict=False)
        )

    if not same(cand_a, cand_b):
        return None
    # An output that ignores its inputs passes a judge that checks one input; the reference decides whether that is legitimate.
    return V.Flag.INSENSITIVE + (": the reference's output did not change either" if same(ref_a, ref_b) else "")


def cast_like(ref: Any, cand: Any) -> Any:
    """`ref` with each floating tensor in the dtype of `cand`'s tensor at the same place."""
    if isinstance(ref, list) and isinstance(cand, list):
        return [cast_like(r, c) for r, c in zip(ref, cand, strict=False)]
    if isinstance(ref, dict) and isinstance(cand, dict) and "sampled" in ref and "sampled" in cand:
        return {**ref, "sampled": cast_like(ref["sampled"], cand["sampled"])}
    if (
        isinstance(ref, torch.Tensor)
        and isinstance(cand, torch.Tensor)
        and ref.is_floating_point()
        and cand.is_floating_point()
    ):
        return ref.to(cand.dtype)
    return ref


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a reply's outputs (nested lists, sampled outputs)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def flatten(value: Any) -> list[Any]:
    """Nested lists and tuples as one flat list."""
    return [y for x in value for y in flatten(x)] if isinstance(value, (list, tuple)) else [value]

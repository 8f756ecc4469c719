"""Capture rate of the graph agents on the tiny models, and whether their candidates verify on the CPU.

    python -m bench.models.capture_rate [--compile] [--json]   (from the repository root)

For each model (tests/models/tiny_hf.py's BERT embedder, cross-encoder, Whisper encoder and ViT, and a
module stage wrapping nn.TransformerEncoder with a safetensors checkpoint), each agent: how the graph
was captured, what matched, and the verifier's verdict on its candidate (correctness only: speed is
measured on the GPU). Models are built from configs with random weights in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hetforge.core.hf import HfSource
from hetforge.core.problem import InputSpec, Problem
from hetforge.optimizer.capture import CaptureError, capture
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.library import fuse_graph
from hetforge.optimizer.recipes import Recipe, recipe_candidate_source
from hetforge.optimizer.rewrites import rewrite_graph
from hetforge.optimizer.variants import VariantSpec, variant_candidate_source
from tests.models import tiny_hf

TEXT_BUCKETS = ((("batch", 2), ("seq", 16)), (("batch", 3), ("seq", 7)))
BATCH_BUCKETS = ((("batch", 2),), (("batch", 1),))


def problems(root: Path) -> dict[str, Problem]:
    """The tiny models as stages."""
    from safetensors.torch import save_file

    from tests.optimizer.models.encoder import Encoder

    torch.manual_seed(0)
    save_file(Encoder().state_dict(), str(root / "encoder.safetensors"))
    repo = Path(__file__).resolve().parents[2]
    return {
        "bert-embedder": Problem(
            hf=HfSource(str(tiny_hf.bert(root / "bert")), "embedding", max_length=16), buckets=TEXT_BUCKETS
        ),
        "cross-encoder": Problem(
            hf=HfSource(str(tiny_hf.bert(root / "xenc", classifier=True)), "classification", max_length=16),
            buckets=TEXT_BUCKETS,
        ),
        "whisper-encoder": Problem(
            hf=HfSource(str(tiny_hf.whisper_encoder(root / "whisper")), "audio_encoder"), buckets=BATCH_BUCKETS
        ),
        "vit": Problem(hf=HfSource(str(tiny_hf.vit(root / "vit")), "vision_encoder"), buckets=BATCH_BUCKETS),
        "transformer-encoder": Problem(
            module="tests.optimizer.models.encoder:Encoder",
            base_dir=str(repo),
            signature=(InputSpec("x", ("batch", "seq", 32)),),
            weights=str(root / "encoder.safetensors"),
            buckets=TEXT_BUCKETS,
        ),
    }


def measure(name: str, problem: Problem, scratch: Path, compile_recipe: bool) -> list[dict]:
    """One row per agent: capture method, matches, verdict."""
    loaded = problem.load()
    inputs = loaded.main_inputs(0)
    rows = []
    options = VerifyOptions(trials=2, time=False, trusted_candidate=True, startup_timeout_s=300, timeout_s=300)

    def judged(agent: str, source: str, row: dict) -> dict:
        path = scratch / f"{name}_{agent}.py"
        path.write_text(source)
        started = time.monotonic()
        verdict = verify(problem, path, options)
        row["verdict"] = str(verdict.verdict)
        row["reason"] = f"{verdict.reasons[0].kind}: {verdict.reasons[0].message}"[:200] if verdict.reasons else ""
        row["verify_s"] = round(time.monotonic() - started, 1)
        return row

    for agent in ("rewrites", "library"):
        row = {"model": name, "agent": agent}
        try:
            gm = capture(loaded.build(), inputs)
        except CaptureError as err:
            rows.append({**row, "capture": "failed", "matched": {}, "verdict": "-", "reason": str(err)[:200]})
            continue
        row["capture"] = gm.meta["capture"]
        matched = rewrite_graph(gm) if agent == "rewrites" else fuse_graph(gm, inputs)
        row["matched"] = matched
        if not matched:
            rows.append({**row, "verdict": "-", "reason": "no pattern matched: no candidate"})
            continue
        spec = VariantSpec(rewrites=tuple(matched)) if agent == "rewrites" else VariantSpec(library=True)
        rows.append(judged(agent, variant_candidate_source(problem, spec), row))
    recipes = [Recipe("eager")] + ([Recipe("compile", "default")] if compile_recipe else [])
    for recipe in recipes:
        row = {"model": name, "agent": f"recipe:{recipe.name}", "capture": "-", "matched": {}}
        rows.append(judged(f"recipe_{recipe.name}", recipe_candidate_source(problem, recipe), row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also verify the torch.compile recipe (slow on a CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for name, problem in problems(root).items():
            rows += measure(name, problem, root, args.compile)
    if args.json:
        print(json.dumps(rows))
        return
    print("| model | agent | capture | matched | verdict (CPU, strict) | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        matched = ", ".join(f"{k} {v}" for k, v in r["matched"].items()) or "-"
        print(f"| {r['model']} | {r['agent']} | {r['capture']} | {matched} | {r['verdict']} | {r['reason']} |")


if __name__ == "__main__":
    main()

"""`hetforge verify`: judge one candidate file against its reference, and register it on request."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetforge.cli.common import EXIT_INVALID, Device, require_device, require_file
from hetforge.cli.render import print_verdict
from hetforge.core.precision import Precision


class Baseline(StrEnum):
    eager = "eager"
    compile = "compile"


def verify(
    reference: Annotated[
        Path, typer.Argument(help="Reference problem file (Model, get_inputs, get_init_inputs).", show_default=False)
    ],
    candidate: Annotated[Path, typer.Argument(help="Candidate file defining ModelNew.", show_default=False)],
    device: Annotated[Device, typer.Option(help="Where to run and time both.")] = Device.cpu,
    precision: Annotated[
        Precision, typer.Option(help="Tolerance policy: strict fp32, or tf32 / bf16 where allowed.")
    ] = Precision.STRICT,
    trials: Annotated[int, typer.Option(min=1, max=100, help="Correctness trials on fresh inputs.")] = 3,
    timeout: Annotated[
        float, typer.Option(min=1, max=3600, help="Seconds per worker request before a candidate counts as hung.")
    ] = 60.0,
    baseline: Annotated[
        Baseline, typer.Option(help="Time the reference eager or under torch.compile.")
    ] = Baseline.eager,
    rounds: Annotated[
        int, typer.Option(min=1, max=100, help="Timing rounds (reference and candidate interleaved).")
    ] = 5,
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Check correctness only.")] = False,
    min_speedup: Annotated[
        float, typer.Option(min=0, help="Reject candidates slower than this speedup (0: never).")
    ] = 0.0,
    review_speedup: Annotated[
        float, typer.Option(min=0, help="A larger speedup over the reference is accepted but flagged for review.")
    ] = 10.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the verdict as one JSON object on the last line.")
    ] = False,
    register: Annotated[
        Optional[str], typer.Option(help="If accepted, store the candidate in the kernel registry under this name.")
    ] = None,
    weights_from_reference: Annotated[
        bool,
        typer.Option(
            "--weights-from-reference", help="Load Model's state_dict into ModelNew (an agent's module variant)."
        ),
    ] = False,
) -> None:
    """Judge a candidate kernel against its reference: correctness on fresh inputs, then speed.

    Exit 0 accepted, 1 rejected, 2 usage or I/O error.
    """
    from hetforge.core.problem import Problem
    from hetforge.optimizer.judge import VerifyOptions
    from hetforge.optimizer.judge import verify as run_verify

    for path in (reference, candidate):
        require_file(path)
    require_device(device)
    policy = precision.value
    options = VerifyOptions(
        device=device.value,
        precision=policy,
        trials=trials,
        timeout_s=timeout,
        baseline=baseline.value,
        rounds=rounds,
        time=not no_timing,
        min_speedup=min_speedup,
        review_speedup=review_speedup,
        weights_from_reference=weights_from_reference,
    )
    result = run_verify(Problem(file=str(reference)), candidate, options)
    variant = None
    if register and result.accepted:
        variant = register_candidate(reference, candidate, register, device.value, policy, result.to_dict())
    if as_json:
        typer.echo(result.to_json())
    else:
        print_verdict(result)
        if variant is not None:
            typer.echo(f"registered as variant {variant.id} ({variant.status})")
    raise typer.Exit(0 if result.accepted else EXIT_INVALID)


def register_candidate(reference: Path, candidate: Path, name: str, device: str, precision: str, verdict: dict):
    """Store an accepted candidate file in the registry, for the reference's fingerprint on this device's class."""
    from hetforge.core.devices import local_device_class
    from hetforge.core.problem import Problem
    from hetforge.kernels.registry import Registry

    return Registry().add(
        fingerprint=Problem(file=str(reference)).load().fingerprint(),
        device_class=local_device_class(device),
        precision=precision,
        name=name,
        agent="human",
        source=candidate.read_text(),
        verdict=verdict,
        recipe={"kind": "candidate_file", "file": candidate.name},
    )

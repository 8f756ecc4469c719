"""`hetforge optimize`: search for a faster variant of a stage, write it and report.json, register it.

The stage is a problem file, a pipeline's stage (`PIPELINE.yaml --stage NAME`), or the team's own module
(`pkg.module:Class` or `file.py:Class` with `--inputs`, `--init-args`, `--weights`, `--bucket`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hetforge.cli.common import (
    EXIT_INVALID,
    EXIT_USAGE,
    STARTED,
    Device,
    load_spec,
    names,
    require_device,
    require_file,
)
from hetforge.cli.render import print_leaderboard
from hetforge.core.precision import Precision


def optimize(
    target: Annotated[
        str,
        typer.Argument(
            help="A problem file (Model, get_inputs, get_init_inputs), a pipeline YAML with --stage, or a module "
            "class (pkg.module:Class or file.py:Class) with --inputs.",
            show_default=False,
        ),
    ],
    stage: Annotated[str | None, typer.Option(help="The stage of the pipeline YAML to optimize.")] = None,
    inputs: Annotated[
        str | None,
        typer.Option(
            help='A module\'s inputs: "name:dim,dim,...:dtype" separated by ";", dims numbers or names '
            '(batch, seq, ...), e.g. "x:batch,seq,8:float32;mask:batch,seq:int64".'
        ),
    ] = None,
    init_args: Annotated[
        str | None, typer.Option(help="A module's constructor arguments: a JSON list, or a JSON object of keywords.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="A module's checkpoint: safetensors, or a torch state_dict.")
    ] = None,
    bucket: Annotated[
        list[str] | None,
        typer.Option(
            help="Sizes of the named dimensions of a serving bucket, e.g. batch=8,seq=128 (repeatable; the first is "
            "the main input, every bucket is verified)."
        ),
    ] = None,
    device: Annotated[
        Device, typer.Option(help="Target device: candidates are verified and timed there.")
    ] = Device.cpu,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Numerics the variant may use (default: the stage's policy, else strict).", show_default=False
        ),
    ] = None,
    budget_s: Annotated[
        float, typer.Option(min=1, help="Wall-time budget in seconds: every check and timing ends within it.")
    ] = 60.0,
    agents: Annotated[
        str,
        typer.Option(
            help="Comma-separated agents: recipes, rewrites, library, llm (llm needs HETFORGE_LLM_BASE_URL and HETFORGE_LLM_MODEL)."
        ),
    ] = "recipes,rewrites,library,llm",
    hint: Annotated[str, typer.Option(help="A human hint: goes into every LLM prompt and the report.")] = "",
    llm_agents: Annotated[
        int, typer.Option(min=1, max=3, help="LLM swarm size (one strategy each: fuse, reexpress, tile).")
    ] = 3,
    llm_turns: Annotated[
        int, typer.Option(min=1, max=10, help="Answers per LLM conversation (first try, then repairs).")
    ] = 3,
    recipes: Annotated[
        str, typer.Option(help="Only these compiler recipes (comma-separated names; eager always runs).")
    ] = "",
    compose: Annotated[
        bool, typer.Option(help="Round 2: join the round-1 winners (rewrites, library, compile) into one variant.")
    ] = True,
    trials: Annotated[
        int, typer.Option(min=1, max=20, help="Correctness trials per candidate, each on fresh inputs.")
    ] = 3,
    rounds: Annotated[
        int, typer.Option(min=1, max=20, help="Timing rounds per candidate (interleaved with the reference).")
    ] = 3,
    out: Annotated[Path, typer.Option(help="Folder for the best variant (a candidate file) and report.json.")] = Path(
        "hetforge-out"
    ),
    interactive: Annotated[bool, typer.Option(help="Ask before keeping a variant flagged needs_review.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")] = False,
) -> None:
    """Search for a faster implementation of a problem: every candidate verified on the target device.

    Writes the best variant as a candidate file plus report.json, and registers it.
    Exit 0 with a winner, 1 without one, 2 usage error.
    """
    from rich.console import Console

    from hetforge.optimizer.supervisor import OptimizeTask
    from hetforge.optimizer.supervisor import optimize as run_optimize

    require_device(device)
    reference, stage_policy, where = resolve_target(target, stage, inputs, init_args, weights, bucket or [])
    loaded = load_reference_or_exit(reference, where)
    policy = precision.value if precision is not None else stage_policy
    console = Console(soft_wrap=True, stderr=as_json)
    task = OptimizeTask(
        None,
        device.value,
        policy,
        budget_s,
        names(agents),
        hint,
        llm_agents=llm_agents,
        llm_turns=llm_turns,
        recipes=names(recipes),
        compose=compose,
        trials=trials,
        rounds=rounds,
        problem=reference.to_json(),
    )
    records_so_far: list = []

    def progress_and_keep(record) -> None:
        records_so_far.append(record)
        shown = f"{record.speedup:.3f}x" if record.verdict is not None and record.verdict.speedup else "-"
        colour = {"accepted": "green", "rejected": "red", "needs_review": "yellow"}.get(record.status, "white")
        console.print(
            f"round {record.round} [{colour}]{record.status:>12}[/] {shown:>9}  {record.name}  {record.note[:120]}",
            highlight=False,
        )

    def approve(record) -> bool:
        if not interactive:
            return False
        print_leaderboard(console, records_so_far + [record])
        return typer.confirm(f"{record.name} is flagged ({'; '.join(record.verdict.flags)}). Keep it?", default=False)

    def notice(text: str) -> None:
        console.print(f"[yellow]{text}[/]", highlight=False)

    try:
        report = run_optimize(task, out / "candidates", progress_and_keep, approve, notice, started=STARTED)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    out.mkdir(parents=True, exist_ok=True)
    doc = report.to_json()
    best_path = None
    if report.winner is not None:
        best_path = out / "best_variant.py"
        best_path.write_text(report.winner.source)
        doc.update(register(loaded.fingerprint(), report, device.value, policy))
        if "not_registered" in doc:
            console.print(f"[yellow]not registered[/]: {doc['not_registered']}")
    if not as_json:
        print_leaderboard(console, report.candidates)
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    summary = {
        "best_variant_path": str(best_path) if best_path else None,
        "speedup_vs_eager": report.speedup_vs_eager,
        "speedup_vs_compile": report.speedup_vs_compile,
        "compile_baseline": report.compile_baseline,
        "claim": report.claim,
        "winner_agent": doc["winner_agent"],
        "verdict": "accepted" if report.winner else "none",
        "report": str(out / "report.json"),
        "registered_variant": doc.get("registered_variant"),
        "not_registered": doc.get("not_registered"),
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(summary)
    raise typer.Exit(0 if report.winner else EXIT_INVALID)


def register(fingerprint: str, report, device: str, precision: str) -> dict:
    """report.json's registration keys for the winner: `registered_variant`, else `not_registered` (why)."""
    from hetforge.core.devices import local_device_class
    from hetforge.kernels.registry import Registry
    from hetforge.optimizer.registration import register_winner

    done = register_winner(
        report,
        Registry(),
        fingerprint=fingerprint,
        device_class=local_device_class(device),
        precision=precision,
    )
    if done.variant is None:
        return {"registered_variant": None, "not_registered": done.reason}
    return {"registered_variant": done.variant.id}


def resolve_target(target: str, stage: str | None, inputs: str | None, init_args: str | None, weights, buckets):
    """(Problem, the default precision policy, how to name a failure of its code) for the command's target;
    exit 1 or 2 with one line when it is malformed."""
    from hetforge.core.problem import Problem, ProblemError

    def usage(message: str):
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_USAGE)

    module_options = [n for n, v in (("--inputs", inputs), ("--init-args", init_args), ("--weights", weights)) if v]
    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        if stage is None:
            usage(f"{target}: a pipeline needs --stage NAME (the model stage to optimize)")
        if module_options or buckets:
            usage(f"{', '.join(module_options or ['--bucket'])}: a pipeline stage declares these in its YAML")
        return _stage_target(path, stage)
    if stage is not None:
        usage(f"--stage: {target} is not a pipeline YAML")
    location, colon, attr = target.rpartition(":")
    if path.is_file() or not colon:
        require_file(path)
        if module_options or buckets:
            usage(f"{', '.join(module_options or ['--bucket'])}: a problem file declares its own inputs")
        return Problem(file=str(path.resolve())), Precision.STRICT.value, f"problem file {target}"
    if not attr or not location:
        usage(f'Got "{target}" for the target: a problem file, PIPELINE.yaml, pkg.module:Class or file.py:Class')
    if not inputs:
        usage(f"{target}: a module needs --inputs (its input signature)")
    try:
        signature = tuple(_input_spec(part) for part in inputs.split(";") if part.strip())
        args, kwargs = _init_args(init_args)
        sizes = tuple(_bucket(b) for b in buckets)
        problem = Problem(
            module=target,
            base_dir=str(Path.cwd()),
            signature=signature,
            weights=str(weights.resolve()) if weights else None,
            init_args=args,
            init_kwargs=kwargs,
            buckets=sizes,
        )
    except (ValueError, ProblemError) as err:
        usage(str(err))
    if weights is not None:
        require_file(weights)
    return problem, Precision.STRICT.value, f"module {target}"


def _input_spec(text: str):
    from hetforge.core.problem import InputSpec

    parts = [p.strip() for p in text.split(":")]
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(f'Got "{text}" for --inputs: name:dim,dim,...[:dtype]')
    dims = tuple(int(d) if d.strip().isdigit() else d.strip() for d in parts[1].split(",") if d.strip())
    dtype = parts[2] if len(parts) == 3 else "float32"
    import torch

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f'Got "{dtype}" for the dtype of input {parts[0]}: a torch dtype such as float32 or int64')
    return InputSpec(parts[0], dims, dtype)


def _init_args(text: str | None) -> tuple[tuple, dict]:
    if not text:
        return (), {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f'Got "{text}" for --init-args: JSON ({err.msg})') from None
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    raise ValueError(f'Got "{text}" for --init-args: a JSON list of arguments or an object of keywords')


def _bucket(text: str) -> tuple[tuple[str, int], ...]:
    sizes = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f'Got "{text}" for --bucket: name=size pairs separated by commas, e.g. batch=8,seq=128')
        sizes[name.strip()] = int(value)
    return tuple(sorted(sizes.items()))


def _stage_target(path: Path, name: str):
    from hetforge.spec.models import ModelStage
    from hetforge.spec.stages import stage_problem

    require_file(path)
    pipeline = load_spec(path)
    try:
        stage = pipeline.stage(name)
    except KeyError:
        models = [s.name for s in pipeline.stages if isinstance(s, ModelStage)]
        typer.echo(f'error: {path}: no stage "{name}"; its model stages: {", ".join(models) or "none"}', err=True)
        raise typer.Exit(EXIT_USAGE) from None
    if not isinstance(stage, ModelStage):
        typer.echo(f'error: {path}: stage "{name}" is a {stage.kind} stage: only model stages are optimized', err=True)
        raise typer.Exit(EXIT_USAGE)
    return stage_problem(stage, path.resolve().parent), Precision(stage.precision).value, (pipeline, name)


def load_reference_or_exit(problem, where):
    """The loaded reference with one instance built (so its import, constructor and checkpoint run here), or exit 1
    with one line naming the stage: its code failing is the user's to fix, never a traceback."""
    try:
        loaded = problem.load()
        loaded.build()
    except Exception as err:  # noqa: BLE001 - the user's import, constructor or checkpoint: any error is one line
        if isinstance(where, tuple):
            from hetforge.spec.stages import stage_code_error

            message = str(stage_code_error(*where, err))
        else:
            cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
            message = f"{where}: {type(err).__name__}: {cause}".rstrip(": ")
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    return loaded

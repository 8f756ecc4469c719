"""Terminal rendering shared by commands: a verdict, a leaderboard of candidates, a table."""

from __future__ import annotations


def print_verdict(result) -> None:
    """One verification result (a `VerifyResult`): the verdict, its reasons, flags, trials and timing."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    colour = "green" if result.accepted else "red"
    console.print(
        f"[bold {colour}]{result.verdict}[/]"
        + (" [yellow](needs review)[/]" if result.needs_review else "")
        + f"  on {result.device}, precision {result.precision}, {result.elapsed_s:.1f} s"
    )
    for reason in result.reasons:
        console.print(f"  [red]{reason.kind}[/]: {reason.message}", highlight=False)
    for flag in result.flags:
        console.print(f"  [yellow]flag[/] {flag}", highlight=False)
    for note in result.notes:
        console.print(f"  note {note}", highlight=False)
    for trial in result.trials:
        console.print(
            f"  trial seed {trial.seed}: max abs err {trial.max_abs_err:.3g}, max rel err {trial.max_rel_err:.3g}"
        )
    if result.speedup is not None:
        console.print(
            f"  reference {result.reference_ms:.4f} ms ({result.baseline}), candidate {result.candidate_ms:.4f} ms: "
            f"[bold]{result.speedup:.3f}x[/]"
        )


def print_leaderboard(console, records) -> None:
    """An optimization's candidates (`CandidateRecord`s), fastest first."""
    from rich.table import Table

    table = Table(title="candidates, fastest first")
    for col in ("candidate", "agent", "round", "status", "speedup vs eager [95% interval]", "note"):
        table.add_column(col)
    for r in sorted(records, key=lambda r: -r.speedup):
        table.add_row(r.name, r.agent, str(r.round), r.status, _speedup(r), r.note[:80])
    console.print(table)


def _speedup(record) -> str:
    if not record.speedup:
        return "-"
    interval = record.verdict.interval if record.verdict is not None else {}
    if not interval:
        return f"{record.speedup:.3f}x"
    high = "inf" if interval["high"] is None else f"{interval['high']:.3f}"
    return f"{record.speedup:.3f}x [{interval['low']:.3f}-{high}]"


def print_table(columns, rows, title: str | None = None) -> None:
    """A rich table of `rows` (each a sequence of strings) under `columns`, on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)

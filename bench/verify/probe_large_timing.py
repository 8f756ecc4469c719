"""Probe: how steady are per-call CUDA timings of a memory-bound reduction as its input grows?

The verifier times `calls` distinct input sets per round (an L2 flush before each call), rounds
interleaved with the candidate's. At t1_rowsum's 3 GB size (1.1 ms a call on the H100) the suite's
run read medians of 1.13-1.30 ms for the same eager module across one run's verifications. This probe
times x.sum(dim=1) the verifier's way, per call, and prints where the slow calls fall: by size, by
how many distinct input sets a round cycles through, and by position in the round.

    python3 bench/verify/probe_large_timing.py            # CUDA only; about a minute on an H100
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def timed_calls(inputs: list[torch.Tensor], calls: int, flush: torch.Tensor) -> list[float]:
    """Per-call ms of `calls` back-to-back x.sum(dim=1), cycling over `inputs`, L2 flushed before each (as
    the verifier's worker times)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for i, (start, end) in enumerate(events):
        flush.zero_()
        start.record()
        inputs[i % len(inputs)].sum(dim=1)
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def time_rounds(
    shape: tuple[int, ...], distinct: int, calls: int, rounds: int, flush: torch.Tensor
) -> list[list[float]]:
    """Per-call ms, one list per round: `calls` calls a round cycling over `distinct` input sets."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(shape, device="cuda", generator=gen) for _ in range(distinct)]
    for _ in range(3):
        inputs[0].sum(dim=1)
    torch.cuda.synchronize()
    out = [timed_calls(inputs, calls, flush) for _ in range(rounds)]
    del inputs
    torch.cuda.empty_cache()
    return out


def transient(shape: tuple[int, ...], make: str, pause_s: float, calls: int, flush: torch.Tensor) -> list[float]:
    """Per-call ms of `calls` back-to-back calls right after making 4 input sets (`make`: randn as the
    verifier's get_inputs does, or a cheap fill) and an idle `pause_s`."""
    torch.cuda.synchronize()
    if make == "randn":
        inputs = [torch.randn(shape, device="cuda") for _ in range(4)]
    else:
        inputs = [torch.empty(shape, device="cuda").fill_(1.0) for _ in range(4)]
    torch.cuda.synchronize()
    time.sleep(pause_s)
    times = timed_calls(inputs, calls, flush)
    del inputs
    torch.cuda.empty_cache()
    return times


def after_free(
    shape: tuple[int, ...], free_gb: float, empty_cache: bool, pause_s: float, calls: int, flush: torch.Tensor
) -> list[float]:
    """Per-call ms of back-to-back calls on inputs already resident and warm, right after another buffer of
    `free_gb` is allocated, written and freed (`empty_cache`: handed back to the driver, not kept cached)."""
    inputs = [torch.randn(shape, device="cuda") for _ in range(2)]
    for _ in range(20):
        inputs[0].sum(dim=1)
    torch.cuda.synchronize()
    time.sleep(0.5)  # whatever the inputs' own allocation set off is over
    if free_gb:
        scratch = torch.empty(int(free_gb * 1e9) // 4, dtype=torch.float32, device="cuda").fill_(1.0)
        torch.cuda.synchronize()
        del scratch
        if empty_cache:
            torch.cuda.empty_cache()
    time.sleep(pause_s)
    times = timed_calls(inputs, calls, flush)
    del inputs
    torch.cuda.empty_cache()
    time.sleep(0.5)
    return times


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA only", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    flush = torch.empty(2 * props.L2_cache_size // 4, dtype=torch.int32, device="cuda")
    print(f"# {props.name}, torch {torch.__version__}")
    rows = []
    for batch in (16, 48, 176):  # 256 MB, 805 MB, 2.95 GB of fp32 input
        shape = (batch, 256, 128, 128)
        gb = batch * 256 * 128 * 128 * 4 / 1e9
        for distinct, calls in ((4, 4), (8, 8), (1, 8), (2, 16)):
            if distinct * gb > 30:
                continue
            per_round = time_rounds(shape, distinct, calls, 5, flush)
            flat = [t for r in per_round for t in r]
            q = statistics.quantiles(flat, n=10)
            medians = [statistics.median(r) for r in per_round]
            by_pos = [statistics.median(r[i] for r in per_round) for i in range(calls)]
            rows.append(
                (
                    f"{gb:.2f}",
                    distinct,
                    calls,
                    min(flat),
                    q[0],
                    statistics.median(flat),
                    q[-1],
                    max(flat),
                    min(medians),
                    max(medians),
                    max(by_pos[:1]) / statistics.median(by_pos[1:]),
                )
            )
            print(f"{gb:.2f} GB distinct={distinct} calls={calls}: by position {[round(t, 3) for t in by_pos]}")
            print("   rounds:", [[round(t, 3) for t in r] for r in per_round])
    # "slow": over 1.05x the median of the 2.95 GB, 2-set, 16-call rounds above (a round of only slow calls
    # would not show against its own fastest)
    steady = statistics.median(t for r in time_rounds((176, 256, 128, 128), 2, 16, 5, flush) for t in r)
    print(f"\n# right after making the inputs: per-call ms of 48 back-to-back calls (2.95 GB; steady: {steady:.3f} ms)")
    for make, pause in (("randn", 0.0), ("randn", 0.1), ("randn", 0.5), ("fill", 0.0), ("randn", 0.0)):
        series = transient((176, 256, 128, 128), make, pause, 48, flush)
        slow = sum(t > 1.05 * steady for t in series)
        print(f"{make} pause {pause:.1f} s: {slow} of 48 calls >5% over steady;", [round(t, 3) for t in series])
    print("\n# resident, warm inputs (2 x 2.95 GB) timed right after another buffer is freed: 40 back-to-back calls")
    for free_gb, empty, pause in (
        (0, False, 0.0),
        (12, True, 0.0),
        (12, False, 0.0),
        (24, True, 0.0),
        (24, True, 0.1),
        (12, True, 0.0),
    ):
        series = after_free((176, 256, 128, 128), free_gb, empty, pause, 40, flush)
        slow = sum(t > 1.05 * steady for t in series[1:])
        print(
            f"freed {free_gb} GB, empty_cache={empty}, pause {pause:.1f} s: {slow} of 39 calls after the first >5% over steady;",
            [round(t, 3) for t in series],
        )
    print()
    print(
        "| input GB | distinct sets | calls/round | min ms | p10 | median | p90 | max | round medians min-max | first call / rest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for gb, d, c, mn, p10, med, p90, mx, rmin, rmax, first in rows:
        print(
            f"| {gb} | {d} | {c} | {mn:.3f} | {p10:.3f} | {med:.3f} | {p90:.3f} | {mx:.3f} | {rmin:.3f}-{rmax:.3f} | {first:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

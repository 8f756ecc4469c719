"""The judge's channel: memory follows the bytes that arrive, never what a frame claims; every deadline holds."""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from hetforge.core.problem import Problem
from hetforge.optimizer import verdict as V
from hetforge.optimizer.channel import Channel, ChannelCorrupt, ChannelTimeout, encode
from hetforge.optimizer.judge import VerifyOptions, verify

HERE = Path(__file__).resolve().parent
GB3 = 3_000_000_000


def _forged(nbytes: int) -> bytes:
    head = json.dumps({"outputs": {"__tensor__": 0, "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes}}).encode()
    return len(head).to_bytes(8, "big") + head


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _trickle(fd: int, stop: threading.Event) -> None:
    """A slow sender: one byte every 50 ms, so a deadline per read (not per frame) would never expire."""
    while not stop.is_set():
        try:
            os.write(fd, b"\0")
        except OSError:
            return
        time.sleep(0.05)


def test_a_frame_claiming_3_gb_allocates_nothing_ahead_and_times_out_on_its_deadline(pipe):
    r, w = pipe
    os.write(w, _forged(GB3))
    stop = threading.Event()
    sender = threading.Thread(target=_trickle, args=(w, stop), daemon=True)
    sender.start()
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ChannelTimeout):
            Channel(r, w).recv(timeout_s=2.0)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stop.set()
    assert peak < 16 << 20, f"{peak} bytes allocated for a frame that delivered a few bytes"
    assert elapsed < 2.0 + 5.0  # the frame's deadline, not one per chunk


def test_a_claim_beyond_the_expected_size_is_refused_before_reading_it(pipe):
    r, w = pipe
    os.write(w, _forged(GB3))
    tracemalloc.start()
    try:
        with pytest.raises(ChannelCorrupt, match="at most 1048576 expected"):
            Channel(r, w).recv(timeout_s=10.0, max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    "header",
    [
        {"outputs": {"__tensor__": 7, "dtype": "uint8", "shape": [0], "nbytes": 0}},  # no such payload
        {"outputs": {"__tensor__": 0, "dtype": "uint8", "shape": "x", "nbytes": 0}},
        {"outputs": {"__tensor__": 0, "dtype": "uint8", "shape": [1], "nbytes": "many"}},
        {"outputs": {"__tensor__": 0, "dtype": "float32", "shape": [3], "nbytes": 4}},  # bytes do not fit the shape
    ],
)
def test_malformed_tensor_references_are_corrupt_frames_not_crashes(pipe, header):
    r, w = pipe
    head = json.dumps(header).encode()
    nbytes = header["outputs"]["nbytes"] if isinstance(header["outputs"]["nbytes"], int) else 0
    os.write(w, len(head).to_bytes(8, "big") + head + b"\0" * nbytes)
    with pytest.raises(ChannelCorrupt):
        Channel(r, w).recv(timeout_s=5.0)


def test_a_deeply_nested_header_is_corrupt(pipe):
    r, w = pipe
    head = b"[" * 100_000 + b"]" * 100_000
    sender = threading.Thread(target=os.write, args=(w, len(head).to_bytes(8, "big") + head), daemon=True)
    sender.start()
    with pytest.raises(ChannelCorrupt):
        Channel(r, w).recv(timeout_s=10.0)


def test_tensors_across_chunk_boundaries_arrive_intact(pipe):
    r, w = pipe
    message = {"outputs": [torch.arange((3 << 20) // 4 + 5, dtype=torch.int32), torch.randn(7, 3)], "n": 2}
    data = encode(message)
    sender = threading.Thread(target=lambda: Channel(r, w).send(message), daemon=True)
    sender.start()
    got = Channel(r, w).recv(timeout_s=30.0, max_bytes=len(data))
    sender.join()
    assert got["n"] == 2 and all(torch.equal(a, b) for a, b in zip(got["outputs"], message["outputs"], strict=True))


def test_a_send_to_a_reader_that_never_reads_times_out(pipe):
    r, w = pipe
    with pytest.raises(ChannelTimeout):
        Channel(r, w).send({"blob": torch.zeros(4 << 20, dtype=torch.uint8)}, timeout_s=1.0)


@pytest.mark.parametrize(
    "nbytes, kind",
    [
        (GB3, V.RejectKind.PROTOCOL),  # beyond twice the reference's 128 KiB output: refused unread
        (200_000, V.RejectKind.TIMEOUT),  # a plausible size whose bytes never come: the deadline ends it
    ],
)
def test_a_candidate_forging_a_large_frame_is_rejected_within_the_timeout(tmp_path, nbytes, kind):
    candidate = tmp_path / "forges_large_frame.py"
    candidate.write_text((HERE / "confinement" / "forges_large_frame.py").read_text().replace("{nbytes}", str(nbytes)))
    options = VerifyOptions(trials=1, time=False, threads=1, timeout_s=5)
    tracemalloc.start()
    try:
        result = verify(Problem(file=str(HERE / "problems" / "linear_relu.py")), candidate, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.accepted and result.reasons[0].kind == kind, result.reasons
    # the correctness phase ends within the timeout plus the worker's kill (bounded at 10 s), never the claim's time
    assert result.phases_s["correctness"] < 5 + 20, result.phases_s
    assert peak < 256 << 20, f"the judge allocated {peak} bytes"

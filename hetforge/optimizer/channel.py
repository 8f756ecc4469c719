"""Framed messages between the judge and a worker: a JSON header plus raw tensor bytes.

Never pickle: unpickling bytes a candidate controls would run its code in the judge. A frame is
  8-byte big-endian header length | JSON header | tensor payloads, in header order
and a value in the header is a JSON value, a tensor reference {"__tensor__": i}, or a list of them.
The reader never allocates what a frame claims before its bytes arrive: it reads in chunks of at most
1 MiB into a buffer that at most doubles, so memory follows the bytes received, and it refuses a frame
whose tensors add up to more than the caller expects (`max_bytes`: the judge knows the size of the
reference's outputs) before reading any of them. One deadline covers the whole frame: a worker that
trickles bytes cannot stretch it. Sends to a worker take a deadline too (a worker that stops reading
cannot hold the judge).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import time
from typing import Any

import numpy as np
import torch

_LEN = struct.Struct(">Q")
MAX_HEADER_BYTES = 16 << 20
_CHUNK = 1 << 20  # bytes per read: what a claim can make the reader allocate ahead of the data
_PIPE_BUF = 4096  # a write of at most this many bytes to a pipe that select() calls writable does not block


class ChannelClosed(Exception):
    """The other end closed the pipe (it exited or crashed)."""


class ChannelTimeout(Exception):
    """No complete frame arrived before the deadline."""


class ChannelCorrupt(Exception):
    """The bytes received are not a well-formed frame."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame holding `message`; tensors anywhere in it are sent as raw bytes."""
    return b"".join(bytes(part) for part in _frame(message))


def _frame(message: dict[str, Any]) -> list:
    """The frame as buffers to write in order (tensor bytes are not copied into one string first)."""
    payloads: list = []
    header = _pack(message, payloads)
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)) + head, *payloads]


def _pack(value: Any, payloads: list) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        payloads.append(raw)
        return {
            "__tensor__": len(payloads) - 1,
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "nbytes": len(raw),
        }
    if isinstance(value, dict):
        return {str(k): _pack(v, payloads) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v, payloads) for v in value]
    return value


_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex64",
    )
}


def _unpack(value: Any, payloads: list[bytes]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        dtype = _DTYPES.get(value.get("dtype"))
        if dtype is None:
            raise ChannelCorrupt(f"unsupported dtype {value.get('dtype')!r}")
        shape = [int(d) for d in value["shape"]]
        raw = payloads[int(value["__tensor__"])]
        count = int(np.prod(shape)) if shape else 1
        if len(raw) != count * torch.empty((), dtype=dtype).element_size():
            raise ChannelCorrupt("tensor payload does not match its shape and dtype")
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)  # raw: a bytearray of its own
    if isinstance(value, dict):
        return {k: _unpack(v, payloads) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, payloads) for v in value]
    return value


def _tensor_sizes(value: Any, out: list[int]) -> None:
    if isinstance(value, dict) and "__tensor__" in value:
        out.append(int(value.get("nbytes", 0)))
    elif isinstance(value, dict):
        for v in value.values():
            _tensor_sizes(v, out)
    elif isinstance(value, list):
        for v in value:
            _tensor_sizes(v, out)


class Channel:
    """Blocking framed I/O over two pipe file descriptors, with deadlines on reads."""

    def __init__(self, read_fd: int, write_fd: int, max_frame_bytes: int = 8 << 30):
        self.read_fd, self.write_fd, self.max_frame_bytes = read_fd, write_fd, max_frame_bytes
        for fd in (read_fd, write_fd):
            _widen_pipe(fd)

    def send(self, message: dict[str, Any], timeout_s: float | None = None) -> None:
        """Write one frame; with `timeout_s`, ChannelTimeout when the other end does not take it in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for part in _frame(message):
            data = memoryview(part).cast("B")
            while data:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [self.write_fd], [], left)[1]:
                        raise ChannelTimeout("the other end did not read within the deadline")
                try:
                    written = os.write(self.write_fd, data[: _PIPE_BUF if deadline is not None else _CHUNK])
                except (BrokenPipeError, OSError) as err:
                    raise ChannelClosed(str(err)) from None
                data = data[written:]

    def recv(self, timeout_s: float | None = None, max_bytes: int | None = None) -> dict[str, Any]:
        """One frame, within `timeout_s`; its tensors may add up to `max_bytes` (default: the channel's limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        limit = self.max_frame_bytes if max_bytes is None else min(max_bytes, self.max_frame_bytes)
        (head_len,) = _LEN.unpack(self._read(_LEN.size, deadline))
        if head_len > MAX_HEADER_BYTES:
            raise ChannelCorrupt(f"header of {head_len} bytes (at most {MAX_HEADER_BYTES})")
        try:
            header = json.loads(self._read(head_len, deadline))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ChannelCorrupt(f"header is not JSON: {str(err)[:200]}") from None
        sizes: list[int] = []
        try:
            _tensor_sizes(header, sizes)
        except (TypeError, ValueError, RecursionError):
            raise ChannelCorrupt("a tensor's size is not a number") from None
        if any(s < 0 for s in sizes) or sum(sizes) > limit:
            raise ChannelCorrupt(f"frame claims {sum(sizes)} bytes of tensors, at most {limit} expected")
        payloads = [self._read(size, deadline) for size in sizes]
        try:
            return _unpack(header, payloads)
        except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError, RecursionError) as err:
            raise ChannelCorrupt(f"malformed tensor reference: {type(err).__name__}") from None

    def _read(self, count: int, deadline: float | None) -> bytearray:
        """Exactly `count` bytes, in one buffer that grows (doubling) as they arrive: never more than twice what
        was received plus one chunk is allocated, whatever `count` claims."""
        out = bytearray(min(count, _CHUNK))
        done = 0
        while done < count:
            if done == len(out):
                out += bytes(min(len(out), count - len(out)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                    raise ChannelTimeout(f"no reply within the deadline ({done}/{count} bytes read)")
            with memoryview(out) as view:
                got = os.readv(self.read_fd, [view[done : min(len(out), done + _CHUNK)]])
            if not got:
                raise ChannelClosed("the other end closed the pipe")
            done += got
        return out


def _widen_pipe(fd: int) -> None:
    """Pipes hold 64 KiB by default: up to the system's maximum (1 MiB by default) means 16x fewer
    reads and waits for large tensors. Best effort: other descriptors and systems keep their size."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as fh:
            limit = int(fh.read())
        fcntl.fcntl(fd, 1031, min(limit, 1 << 20))  # F_SETPIPE_SZ
    except (OSError, ValueError, ImportError):
        pass

"""The processes and log folder of the Ray instance a `hetforge serve` started on this machine.

`hetforge serve` (the embedded default) starts Ray in its own process: GCS, raylet, the dashboard and
runtime-env agents, Serve's controller, proxy and replicas. A SIGKILL of the serve process skips its
shutdown, and some of them (the agents at least) outlive it. They are found again by Ray's session folder
(`<temp>/session_<time>_<pid>`), which Ray's own processes name on their command line, plus their
descendants (workers carry `ray::<Actor>` titles instead). Linux only: read from /proc.

A recorded PID is signalled only while it is still the process that was recorded: the same start time
(field 22 of /proc/PID/stat, in clock ticks since boot) and a command line that is `hetforge serve`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")


def start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (None when there is no such process, or it has exited)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: fields count from the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited (a zombie waits only for its parent to collect it): no process any more
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[str]:
    """The arguments of `pid` (empty when gone or unreadable)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a for a in raw.decode(errors="replace").split("\0") if a]


def is_same_process(pid: int, started: int, must_contain: tuple[str, ...]) -> bool:
    """Whether `pid` still is the process recorded with start time `started`, its command line holding every
    word of `must_contain` (a PID reused by another program is never signalled)."""
    if pid <= 0 or start_ticks(pid) != started:
        return False
    line = " ".join(cmdline(pid))
    return all(word in line for word in must_contain)


def _parents() -> dict[int, int]:
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """The live descendants of `pid`."""
    parents = _parents()
    found = {pid}
    grew = True
    while grew:
        more = {p for p, parent in parents.items() if parent in found and p not in found}
        found |= more
        grew = bool(more)
    found.discard(pid)
    return sorted(found)


def instance_pids(session_dir: str, exclude: int | None = None) -> list[int]:
    """Live processes of the Ray instance whose session folder is `session_dir`: those naming it on their command
    line, and their descendants (`exclude`, the serve process itself, left out)."""
    if not session_dir:
        return []
    parents = _parents()
    found = {pid for pid in parents if pid != os.getpid() and session_dir in " ".join(cmdline(pid))}
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    if exclude is not None:
        found.discard(exclude)
    return sorted(found)


def end_processes(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM `pids`, then SIGKILL what is left after `grace_s`; the PIDs that were signalled."""
    ticks = {pid: start_ticks(pid) for pid in pids}
    signalled = []
    for pid, started in ticks.items():
        if started is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(start_ticks(p) == ticks[p] for p in signalled):
        time.sleep(0.2)
    for pid in signalled:
        if start_ticks(pid) == ticks[pid]:  # still the same process: it ignored SIGTERM (or is stopped)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return signalled


def wait_gone(pid: int, started: int, timeout_s: float) -> bool:
    """Whether process `pid` (with start time `started`) exits within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if start_ticks(pid) != started:
            return True
        time.sleep(0.2)
    return start_ticks(pid) != started


def log_files(session_dir: str, pipeline: str, stage: str | None = None) -> list[Path]:
    """Serve's log files of a deployment in Ray's log folder (`<session>/logs/serve/`): the replicas of `stage`,
    or of every deployment of the pipeline plus Serve's controller and proxy when no stage is named."""
    folder = Path(session_dir) / "logs" / "serve"
    if not folder.is_dir():
        return []
    app = _file_name(pipeline)
    if stage is not None:
        return sorted(folder.glob(f"replica_{app}_{_file_name('stage-' + stage)}_*.log"))
    return sorted([*folder.glob(f"replica_{app}_*.log"), *folder.glob("controller_*.log"), *folder.glob("proxy_*.log")])


def _file_name(name: str) -> str:
    """A name as Serve writes it into log file names (`FILE_NAME_REGEX` of ray.serve: unprintable and
    `<>:"/\\|?*` characters become `_`)."""
    return "".join("_" if not " " <= c <= "~" or c in '<>:"/\\|?*' else c for c in name)

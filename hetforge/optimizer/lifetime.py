"""Nothing outlives the judge: owner tags on what workers leave, a reaper per judge, a sweep at start-up.

A judge's workers, their pids cgroups and their scratch folders carry the judge's owner tag
(`<pid>.<start time in clock ticks>`: a PID alone can be reused). Three mechanisms, so that every
exit path of the judge is covered, stopped (state T) workers included:

- Each worker asks the kernel for SIGKILL when the judge dies (`PR_SET_PDEATHSIG`, set first thing
  in `hetforge.optimizer.worker`). SIGKILL is the one signal a stopped process acts on at once. The
  kernel sends it when the *thread* that forked the worker exits, so the judge forks all workers
  from one thread that lives as long as the process (`sandbox._spawn`).
- A reaper process per judge (`python -m hetforge.optimizer.lifetime`, standard library only, in a
  session of its own so a signal to the judge's process group does not reach it) holds the read end
  of a pipe that only the judge writes. When the judge ends, normally or by SIGKILL, the pipe reads
  end-of-file and the reaper kills whatever is still in the judge's cgroups (`cgroup.kill` where the
  kernel has it, else SIGKILL to each member until none is left), kills the process groups the judge
  registered, and removes the cgroup and scratch folders.
- `sweep()` at the first worker start of a judge removes what judges that died without a reaper
  left (a reaper killed too, a host reboot kept /tmp): cgroups and scratch folders whose owner is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hetforge.optimizer import confine

SCRATCH_PREFIX = "hetforge-w"  # scratch folders: hetforge-w<owner tag>-<worker name>-<random>
_SCRATCH = re.compile(r"^hetforge-w(\d+)\.(\d+)-")
# cgroups: hetforge-<owner tag>-<serial>; the form without the start time is what earlier versions made
_CGROUP = re.compile(r"^hetforge-(\d+)(?:\.(\d+))?-\d+$")


def start_ticks(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


_tag: tuple[int, str] | None = None


def owner_tag() -> str:
    """This process's tag, `<pid>.<start ticks>` (recomputed after a fork)."""
    global _tag
    pid = os.getpid()
    if _tag is None or _tag[0] != pid:
        _tag = (pid, f"{pid}.{start_ticks(pid) or 0}")
    return _tag[1]


def _alive(pid: int, ticks: int | None) -> bool:
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def owned_cgroups(tag: str | None = None) -> list[Path]:
    """Worker cgroups of the judge tagged `tag`, or (None) of judges that are gone."""
    out = []
    for root in confine.cgroup_roots():
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for path in entries:
            match = _CGROUP.match(path.name)
            if not match or not path.is_dir():
                continue
            pid, ticks = int(match[1]), int(match[2]) if match[2] else None
            if tag is not None:
                if match[2] and f"{pid}.{ticks}" == tag:
                    out.append(path)
            elif not _alive(pid, ticks):
                out.append(path)
    return out


def owned_scratch(tag: str | None = None, tmp: str | None = None) -> list[Path]:
    """Scratch folders of the judge tagged `tag`, or (None) of judges that are gone, in `tmp` (the temp dir)."""
    out = []
    try:
        entries = list(Path(tmp or tempfile.gettempdir()).iterdir())
    except OSError:
        return out
    for path in entries:
        match = _SCRATCH.match(path.name)
        if not match:
            continue
        pid, ticks = int(match[1]), int(match[2])
        if (tag is not None and f"{pid}.{ticks}" == tag) or (tag is None and not _alive(pid, ticks)):
            out.append(path)
    return out


def clean(cgroups: list[Path], scratch: list[Path], groups: list[int] = ()) -> None:
    """Kill every process in `cgroups` and the process `groups`, then remove the cgroups and `scratch` folders."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)  # SIGKILL: a stopped (state T) process acts on it too
        except OSError:
            pass
    for path in cgroups:
        confine.remove_cgroup(str(path))
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)


def sweep(tmp: str | None = None) -> tuple[int, int]:
    """Remove what dead judges left; returns (cgroups, scratch folders) removed."""
    cgroups, scratch = owned_cgroups(), owned_scratch(tmp=tmp)
    clean(cgroups, scratch)
    return len(cgroups), len(scratch)


class Reaper:
    """The judge's side of its reaper: the pipe it holds open, and the process groups it registers."""

    def __init__(self, env: dict[str, str]) -> None:
        read_fd, self._write_fd = os.pipe()  # both ends non-inheritable: workers never hold the write end
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetforge.optimizer.lifetime", owner_tag(), tempfile.gettempdir()],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outside the judge's process group: a group kill of the judge leaves it to clean
            env={k: v for k, v in env.items() if k in ("PATH", "PYTHONPATH", "LANG", "VIRTUAL_ENV")},
        )
        os.close(read_fd)
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        with self._lock:
            try:
                os.write(self._write_fd, (line + "\n").encode())
            except OSError:
                pass  # a reaper that died: PDEATHSIG and the next sweep remain

    def track(self, pgid: int) -> None:
        """Kill process group `pgid` when the judge ends (a worker without a cgroup)."""
        self._say(f"track {pgid}")

    def forget(self, pgid: int) -> None:
        """Process group `pgid` is gone: its number may be reused, never kill it."""
        self._say(f"forget {pgid}")


def reaper_main(tag: str, tmp: str) -> int:
    """Wait for end-of-file on stdin (the judge has ended), then clean up after the judge tagged `tag`."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the judge's end decides when this runs
    groups: set[int] = set()
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        if verb == "track" and arg.isdigit():
            groups.add(int(arg))
        elif verb == "forget" and arg.isdigit():
            groups.discard(int(arg))
    # The groups' leaders are the judge's workers; their numbers cannot be reused while a member lives.
    clean(owned_cgroups(tag), [], sorted(groups))
    time.sleep(0.2)  # members killed by group are reaped by init; then the folders go
    clean(owned_cgroups(tag), owned_scratch(tag, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(reaper_main(sys.argv[1], sys.argv[2]))

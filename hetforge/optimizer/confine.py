"""Confinement of a worker process before it runs candidate code: what generated code may not do.

Applied by the worker to itself (`confine()`), after torch is imported and before any candidate is
loaded, in layers that each work without privileges where the kernel allows:

- environment: the judge starts workers with an allow-list of variables (`worker_environment`), so
  the server's secrets are not there to read; HOME, TMPDIR and the compile caches point into scratch.
- no_new_privs and, when running as root, every capability dropped: root without capabilities
  cannot mount, change namespaces, load modules or bypass the rules below.
- Landlock (Linux 5.13+): writes, deletes, renames and new files only beneath the writable folders
  (the worker's scratch; /dev for device files; its own /proc entry, which the NVIDIA driver writes
  while CUDA starts); TCP bind and connect denied (ABI 4+); signals and
  abstract Unix sockets scoped to the worker's own processes (ABI 6+). Reads stay open: Python and
  torch read their own files.
- seccomp: `socket()` only for AF_UNIX (no network of any family, UDP included); setsid/setpgid
  refused, so every process the candidate forks stays in the worker's process group and dies with
  it; ptrace and cross-process memory access refused; mount, namespaces, chroot refused.
- process count: a pids cgroup (`pids.max`) when the host lets this user make one, else
  RLIMIT_NPROC: a fork bomb gets EAGAIN instead of the machine. Compilers still run (Triton calls
  ptxas, Inductor calls g++), so forking is limited, not forbidden.
- RLIMIT_CPU: a candidate that burns CPU past the limit gets SIGXCPU; no core files.

Each layer reports what it did; a layer the kernel lacks is reported `unavailable`, never silently
assumed (`hetforge verify` prints the report, verdicts carry it).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import platform
import resource
import signal
import stat
import struct
import sys
import time
from pathlib import Path

# Variables a worker keeps from the judge's environment: what Python, torch, Triton and CUDA need.
# HETFORGE_BENCH_: the suite's problem files read their sizes from it (HETFORGE_BENCH_SIZE); a worker without it
# builds the reference at other sizes than the judge's inputs.
_KEEP_PREFIXES = (
    "LC_",
    "CUDA_",
    "NVIDIA_",
    "TORCH",
    "TRITON_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "HETFORGE_WORKER_",
    "HETFORGE_BENCH_",
)
_KEEP = {
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "VIRTUAL_ENV",
    "CC",
    "CXX",
    "TERM",
    "USER",
    "LOGNAME",
    "SHELL",
    "HETFORGE_KERNELS_ON_CPU",
}
# Within the kept prefixes, names that still look like credentials are dropped.
_SECRETISH = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


# glibc's malloc moves its mmap and trim thresholds as a process allocates and frees: a worker could end up
# mapping and faulting in every output tensor of a few hundred KB while the next worker reused heap memory.
# The same eager module then timed 0.08 ms in one worker and 0.25 ms in another (CPU, 1 MB outputs,
# t2_groupnorm_silu: bench/verify/probe_malloc_thresholds.py, results_malloc_cpu.md: half the medians of three
# runs near 0.25 ms; with the thresholds fixed, 16 of 18 at 0.080-0.125 ms). Fixed, so every worker allocates
# the same way: the largest mmap threshold glibc takes (32 MiB), no trimming below 1 GiB.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def worker_environment(parent: dict[str, str], scratch: str, shared_cache: str | None = None) -> dict[str, str]:
    """The environment of a worker whose writable folder is `scratch`: an allow-list, never the server's secrets.

    Compile caches go to `shared_cache` when given (trusted candidates: hetforge's own recipes and
    kernels share compiled code across workers), else into the worker's own scratch.
    """
    env = {
        k: v
        for k, v in parent.items()
        if (k in _KEEP or k.startswith(_KEEP_PREFIXES)) and not any(s in k.upper() for s in _SECRETISH)
    }
    cache = Path(shared_cache) if shared_cache else Path(scratch) / "cache"
    tmp = Path(scratch) / "tmp"
    for folder in (cache / "inductor", cache / "triton", tmp):
        folder.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=scratch,
        TMPDIR=str(tmp),
        XDG_CACHE_HOME=str(cache),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        TORCHINDUCTOR_COMPILE_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        **FIXED_MALLOC,
    )
    return env


# ------------------------------------------------------------------------------------------ libc
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_CAPBSET_DROP = 38, 22, 2, 24

_ARCH = platform.machine()
# Syscall numbers that differ per architecture (Landlock's are the same everywhere).
_NR = {
    "x86_64": {
        "socket": 41,
        "connect": 42,
        "socketpair": 53,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "setsid": 112,
        "setpgid": 109,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "unshare": 272,
        "setns": 308,
        "capset": 126,
        "kexec_load": 246,
        "init_module": 175,
        "finit_module": 313,
        "bpf": 321,
        "perf_event_open": 298,
    },
    "aarch64": {
        "socket": 198,
        "connect": 203,
        "socketpair": 199,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "setsid": 157,
        "setpgid": 154,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "unshare": 97,
        "setns": 268,
        "capset": 91,
        "kexec_load": 104,
        "init_module": 105,
        "finit_module": 273,
        "bpf": 280,
        "perf_event_open": 241,
    },
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


# ------------------------------------------------------------------------------------------ layers
def _no_new_privs() -> str:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS): " + _errno_text())
    return "on"


# Kept until `confine_reads` when the worker may still drop to an unprivileged user: CAP_CHOWN (its scratch folder
# is given to that user), CAP_SETGID, CAP_SETUID, CAP_SETPCAP (to drop these from the bounding set afterwards).
_USER_DROP_CAPS = (0, 6, 7, 8)
UNPRIVILEGED_UID = UNPRIVILEGED_GID = 65534  # "nobody" by convention; no file on a host should belong to it


def _capset(keep: tuple[int, ...] = ()) -> None:
    mask = sum(1 << cap for cap in keep)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = struct.pack("IIIIII", mask, mask, 0, 0, 0, 0)  # {effective, permitted, inheritable} x 2 words
    if _libc.syscall(_NR[_ARCH]["capset"], ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset: " + _errno_text())


def _drop_bounding(keep: tuple[int, ...] = ()) -> None:
    for cap in range(64):
        if cap in keep:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows


def _drop_capabilities(keep: tuple[int, ...] = ()) -> str:
    """Root loses every capability (but `keep`): effective, permitted, inheritable and the bounding set."""
    if os.geteuid() != 0:
        return "not root"
    _drop_bounding(keep)
    _capset(keep)
    return "dropped" + (" (but chown, setuid, setgid until the user drop)" if keep else "")


# Landlock filesystem rights (linux/landlock.h) and the ABI version that introduced each.
_FS = {
    "read_file": (1 << 2, 1),
    "read_dir": (1 << 3, 1),
    "write_file": (1 << 1, 1),
    "remove_dir": (1 << 4, 1),
    "remove_file": (1 << 5, 1),
    "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1),
    "make_reg": (1 << 8, 1),
    "make_sock": (1 << 9, 1),
    "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1),
    "make_sym": (1 << 12, 1),
    "refer": (1 << 13, 2),
    "truncate": (1 << 14, 3),
}
_FILE_RIGHTS = 1 | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # execute, write, read, truncate, ioctl_dev
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1, 2


# Device nodes a worker may open: the usual character devices and what CUDA opens (the NVIDIA driver's nodes). Not
# /dev/shm (other processes' shared memory), not /dev/kmsg, not disks: Landlock rules on these files, not on /dev.
_DEVICE_NAMES = ("null", "zero", "full", "random", "urandom")
_DEVICE_PATTERNS = ("/dev/nvidia*", "/dev/nvidia-caps/*")


def device_nodes() -> list[str]:
    """The character devices of `_DEVICE_NAMES` and `_DEVICE_PATTERNS` present on this host."""
    paths = [f"/dev/{name}" for name in _DEVICE_NAMES]
    for pattern in _DEVICE_PATTERNS:
        paths += sorted(glob.glob(pattern))
    out = []
    for path in paths:
        try:
            if stat.S_ISCHR(os.stat(path).st_mode):
                out.append(path)
        except OSError:
            continue
    return out


def _landlock_abi() -> int:
    return _libc.syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION


def _landlock_layer(abi: int, handled: int, rules: list[tuple[str, int]], net: int = 0, scoped: int = 0) -> None:
    """One Landlock layer on this process: `handled` rights denied except beneath each rule's path."""
    attr = (
        struct.pack("QQQ", handled, net, scoped)
        if abi >= 6
        else struct.pack("QQ", handled, net)
        if abi >= 4
        else struct.pack("Q", handled)
    )
    ruleset = _libc.syscall(_LANDLOCK_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset: " + _errno_text())
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a path this host lacks (a venv's missing python311.zip)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= _FILE_RIGHTS  # a rule on a file takes only the rights a file has
                rule = struct.pack("=Qi", rights & handled, fd)  # struct landlock_path_beneath_attr is packed
                if (
                    _libc.syscall(
                        _LANDLOCK_ADD_RULE,
                        ctypes.c_int(ruleset),
                        ctypes.c_int(1),
                        ctypes.c_char_p(rule),
                        ctypes.c_uint32(0),
                    )
                    != 0
                ):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: " + _errno_text())
            finally:
                os.close(fd)
        if _libc.syscall(_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self: " + _errno_text())
    finally:
        os.close(ruleset)


def _landlock(writable: list[str]) -> str:
    """Writes (and deletes, renames, new files) only beneath `writable`, into the allowed device nodes and the
    process's own /proc entry; TCP denied; signals and abstract Unix sockets scoped to the worker's processes."""
    abi = _landlock_abi()
    if abi < 1:
        return f"unavailable ({_errno_text()})"
    reads = _FS["read_file"][0] | _FS["read_dir"][0]  # reads are `confine_reads`' layer, once the problem is known
    handled = sum(bit for bit, since in _FS.values() if since <= abi) & ~reads
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0
    # /proc/self (this process's own /proc/<pid>, its threads' entries included): the NVIDIA driver writes there while
    # CUDA initializes (without it: cudaGetDeviceCount error 304, found on an H100)
    device_rights = _FS["write_file"][0] | (_FS["truncate"][0] if abi >= 3 else 0)
    devices = device_nodes()
    rules = [(path, handled) for path in writable] + [(d, device_rights) for d in devices]
    _landlock_layer(abi, handled, rules + [("/proc/self", device_rights)], net, scoped)
    parts = [
        "writes only beneath "
        + ", ".join(writable)
        + ", its own /proc entry and the device nodes "
        + " ".join(d.removeprefix("/dev/") for d in devices)
    ]
    parts.append("TCP denied" if net else "TCP not covered (ABI < 4)")
    parts.append("signals scoped" if scoped else "signals not scoped (ABI < 6)")
    return f"abi {abi}: " + "; ".join(parts)


# Classic BPF for seccomp: struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}.
_LD_W_ABS, _JEQ_K, _RET_K, _AND_K = 0x20, 0x15, 0x06, 0x54
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_AF_UNIX, _SOCK_STREAM, _SOCK_SEQPACKET = 1, 1, 5
_X32_BIT = 0x40000000


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def _seccomp() -> str:
    nr = _NR.get(_ARCH)
    if nr is None:
        return f"unavailable (no syscall table for {_ARCH})"
    deny_eperm = [
        "setsid",
        "setpgid",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "kexec_load",
        "init_module",
        "finit_module",
        "bpf",
        "perf_event_open",
        # io_uring performs connect, sendmsg and more without the syscalls this filter sees
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ]
    allow, eperm, eacces = _SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO | errno.EPERM, _SECCOMP_RET_ERRNO | errno.EACCES
    prog = [
        _bpf(_LD_W_ABS, 4),  # seccomp_data.arch
        _bpf(_JEQ_K, _AUDIT_ARCH[_ARCH], 1, 0),
        _bpf(_RET_K, eperm),  # another ABI (i386 via int 0x80): refused
        _bpf(_LD_W_ABS, 0),  # seccomp_data.nr
    ]
    if _ARCH == "x86_64":  # x32 syscalls carry bit 30: refused, they would bypass the numbers below
        prog += [struct.pack("HBBI", 0x45, 0, 1, _X32_BIT), _bpf(_RET_K, eperm)]  # jset
    # socket() and socketpair(): AF_UNIX only (no network of any family: INET, INET6, PACKET, NETLINK, ...), and only
    # stream or seqpacket: a datagram socket sends to any path named in sendto()/sendmsg(), connected or not
    for call in ("socket", "socketpair"):
        prog += [
            _bpf(_JEQ_K, nr[call], 0, 8),  # not this call: skip the block, nr still loaded
            _bpf(_LD_W_ABS, 16),  # seccomp_data.args[0] (low word): the address family
            _bpf(_JEQ_K, _AF_UNIX, 0, 5),
            _bpf(_LD_W_ABS, 24),  # args[1]: the type, with SOCK_NONBLOCK / SOCK_CLOEXEC
            _bpf(_AND_K, 0xF),  # SOCK_TYPE_MASK
            _bpf(_JEQ_K, _SOCK_STREAM, 1, 0),
            _bpf(_JEQ_K, _SOCK_SEQPACKET, 0, 1),
            _bpf(_RET_K, allow),
            _bpf(_RET_K, eacces),
        ]
    # connect(): every socket here is AF_UNIX; abstract names are scoped by Landlock (ABI 6+), but a path names a
    # listener anywhere on the host, and the kernel checks no Landlock right on it. Refused, inside scratch too.
    prog += [_bpf(_JEQ_K, nr["connect"], 0, 1), _bpf(_RET_K, eacces)]
    for name in deny_eperm:
        prog += [_bpf(_JEQ_K, nr[name], 0, 1), _bpf(_RET_K, eperm)]
    prog.append(_bpf(_RET_K, allow))
    program = b"".join(prog)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buffer))  # struct sock_fprog {u16 len; filter *}
    fprog_buf = ctypes.create_string_buffer(fprog)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog_buf), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter: " + _errno_text())
    return (
        "socket: AF_UNIX only, stream or seqpacket; connect refused; setsid/setpgid, ptrace, mount, namespaces, "
        "io_uring refused"
    )


def _process_limit(max_procs: int, cgroup: str | None) -> str:
    if cgroup:
        try:
            Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
            return f"pids cgroup {cgroup} (pids.max {Path(cgroup, 'pids.max').read_text().strip()})"
        except OSError as err:
            reason = f"cgroup {cgroup}: {err.strerror}"
        else:  # pragma: no cover
            reason = ""
    else:
        reason = "no pids cgroup"
    if os.geteuid() == 0:
        return f"unavailable ({reason}; RLIMIT_NPROC does not bind root)"
    mine = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p))
    limit = mine + max_procs
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    return f"RLIMIT_NPROC {limit} ({reason})"


def _owned(proc: Path) -> bool:
    try:
        return proc.stat().st_uid == os.getuid()
    except OSError:
        return False


def cgroup_roots() -> list[Path]:
    """Where worker cgroups are made: cgroup v1's pids hierarchy and the v2 hierarchy (pure, or a hybrid's unified)."""
    candidates = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
    return [root for root in candidates if (root / "cgroup.procs").exists()]


def make_worker_cgroups(name: str, max_procs: int) -> dict[str, str | None]:
    """One worker's cgroups (None where this host does not let us make one): `pids`, whose pids.max bounds its
    process count, and `kill`, a v2 cgroup whose `cgroup.kill` (Linux 5.14+) kills every member at once, stopped
    ones included. On a pure v2 host with the pids controller one folder serves both."""
    made: dict[str, str | None] = {"pids": None, "kill": None}
    for root in cgroup_roots():
        v2 = (root / "cgroup.controllers").exists()
        # v1: a hierarchy of its own per controller (the pids one); v2: the pids controller enabled for children
        has_pids = root.name == "pids" if not v2 else "pids" in _read(root / "cgroup.subtree_control")
        if made["pids"] and (made["kill"] or not v2):
            break
        path = root / f"hetforge-{name}"
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            continue
        used = False
        if has_pids and not made["pids"]:
            try:
                (path / "pids.max").write_text(str(max_procs))
                made["pids"], used = str(path), True
            except OSError:
                pass
        if v2 and not made["kill"] and (path / "cgroup.kill").exists():
            made["kill"], used = str(path), True
        if not used:
            _rmdir(path)
    return made


def join_cgroups(pid: int, paths: list[str]) -> list[str]:
    """Move process `pid` into each cgroup of `paths`; returns those it could not join, with the reason."""
    failed = []
    for path in paths:
        try:
            Path(path, "cgroup.procs").write_text(str(pid))
        except OSError as err:
            failed.append(f"{path}: {err.strerror}")
    return failed


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def remove_cgroup(path: str | None) -> None:
    """Kill whatever is left in the worker's cgroup (children that left its process group), then remove it.

    A fork bomb keeps forking while it is being killed, so first no new process may start (cgroup v2's
    `cgroup.kill` kills them all at once; otherwise pids.max drops to 0), then the survivors are killed
    until the cgroup is empty.
    """
    if not path:
        return
    for control, value in (("cgroup.kill", "1"), ("pids.max", "0")):
        try:
            Path(path, control).write_text(value)
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = [int(p) for p in _read(Path(path, "cgroup.procs")).split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def confine(
    writable: list[str], *, cpu_s: int = 0, max_procs: int = 256, cgroup: str | None = None, drop_user: bool = False
) -> dict[str, str]:
    """Apply every layer to this process (irreversibly); returns what each layer did.

    A layer that fails raises: a worker that asked for confinement and did not get it must not
    run candidates. A layer the kernel does not offer is reported `unavailable`. `drop_user`: the
    worker will switch to an unprivileged user in `confine_reads` (the capabilities that takes are kept
    until then; no candidate code runs before it).
    """
    report = {"process_limit": _process_limit(max_procs, cgroup)}
    if cpu_s > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
        report["cpu"] = f"RLIMIT_CPU {cpu_s} s"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    report["no_new_privs"] = _no_new_privs()
    report["capabilities"] = _drop_capabilities(_USER_DROP_CAPS if drop_user and os.geteuid() == 0 else ())
    report["landlock"] = _landlock(writable)
    report["seccomp"] = _seccomp()
    return report


# What every worker reads besides Python and the problem: system libraries and compilers (Inductor runs g++, Triton
# ptxas), /proc and /sys (torch and the NVIDIA driver read them; other processes' /proc entries stay closed: Landlock
# denies ptrace-mode access outside the worker's domain), and the few files of /etc that libc and the loader read.
_SYSTEM_READS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/proc", "/sys")
_ETC_READS = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "nsswitch.conf",
    "passwd",
    "group",
    "hosts",
    "host.conf",
    "gai.conf",
    "os-release",
    "alternatives",
)


def python_paths() -> list[str]:
    """The Python installation and every import path (site-packages, PYTHONPATH) and library path of this process."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *filter(None, sys.path)}
    paths.update(filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)))
    for compiler in ("CC", "CXX"):
        if os.path.isabs(os.environ.get(compiler, "")):
            paths.update(compiler_paths(os.environ[compiler]))
    return sorted(p for p in paths if os.path.isabs(p) and os.path.realpath(p) != "/")


def compiler_paths(path: str) -> list[str]:
    """What a compiler binary reads besides itself: its folder, and its installation's compiler folders
    (`/opt/gcc/lib/gcc` for `/opt/gcc/bin/gcc`: the driver's headers `.../include/stddef.h` and start files
    `crtbeginS.o` are there). Not the whole prefix: `~/bin/gcc` must not open `~`."""
    folder = os.path.dirname(os.path.realpath(path))
    out = [folder]
    if os.path.basename(folder) == "bin":
        prefix = os.path.dirname(folder)
        out += [
            os.path.join(prefix, sub)
            for sub in ("lib/gcc", "lib64/gcc", "libexec/gcc", "lib/clang", "include")
            if os.path.isdir(os.path.join(prefix, sub))
        ]
    return out


def confine_reads(readable: list[str], writable: list[str], drop_user: bool = False) -> dict[str, str]:
    """The second stage, once the problem is known and before it is loaded: reads (files and folder listings) only
    beneath `readable`, `writable`, the Python installation, the system folders and device nodes; then, with
    `drop_user`, the switch to an unprivileged user where everything read is readable by it."""
    report = {}
    abi = _landlock_abi()
    allowed = sorted({*readable, *writable, *python_paths()} - {"/"})
    if abi < 1:
        report["reads"] = f"unrestricted: Landlock unavailable ({_errno_text()})"
    else:
        rights = _FS["read_file"][0] | _FS["read_dir"][0]
        paths = [*allowed, *_SYSTEM_READS, *(f"/etc/{name}" for name in _ETC_READS), *device_nodes()]
        rules = [(path, rights) for path in paths]
        if abi >= 2:
            # Every layer denies moving a file to another folder (EXDEV) unless it handles "refer" and grants it
            # there (Landlock's docs, LANDLOCK_ACCESS_FS_REFER). Triton's cache writes into tmp.pid_*/ and moves
            # the file up a folder.
            refer = _FS["refer"][0]
            rights |= refer
            rules += [(path, refer) for path in writable]
        _landlock_layer(abi, rights, rules)
        report["reads"] = f"abi {abi}: only beneath " + ", ".join(allowed) + ", system folders, /etc's loader files"
    if drop_user and os.geteuid() == 0:
        report["user"] = _drop_user(allowed, writable)
        report["capabilities"] = "dropped"
    elif os.geteuid() == 0:
        report["user"] = "uid 0 without capabilities (trusted worker)"
    else:
        report["user"] = f"uid {os.geteuid()}"
    return report


def _reachable(path: str) -> bool:
    """Whether an unprivileged user (by the `other` permission bits) can read `path` (traverse, if a folder)."""
    parts = Path(os.path.realpath(path)).parts
    for depth in range(1, len(parts) + 1):
        try:
            info = os.stat(Path(*parts[:depth]))
        except OSError:
            return False
        last = depth == len(parts)
        if stat.S_ISDIR(info.st_mode):
            needed = stat.S_IXOTH | (stat.S_IROTH if last else 0)
        else:
            needed = stat.S_IROTH
        if info.st_mode & needed != needed:
            return False
    return True


def _drop_user(readable: list[str], writable: list[str]) -> str:
    """Become UNPRIVILEGED_UID, owning the writable folders, when it can read what the worker needs; else stay uid 0
    without capabilities and say why."""
    blocked = next((p for p in readable if p not in writable and os.path.exists(p) and not _reachable(p)), None)
    why = f"{blocked} is not readable by uid {UNPRIVILEGED_UID}" if blocked else ""
    if not why:
        # Bottom-up, each folder after what it holds: this process has no CAP_DAC_OVERRIDE any more, so a 0700
        # folder handed to the unprivileged user first could not be searched for its contents.
        try:
            for folder in writable:
                for root, _dirs, files in os.walk(folder, topdown=False):
                    for name in [*(os.path.join(root, n) for n in files), root]:
                        os.lchown(name, UNPRIVILEGED_UID, UNPRIVILEGED_GID)
        except OSError as err:  # e.g. a filesystem without ownership
            why = f"{err.filename} could not be handed over ({err.strerror})"
    _drop_bounding()
    if why:
        _capset()
        return f"uid 0 without capabilities: {why}"
    os.setgroups([])
    os.setresgid(UNPRIVILEGED_GID, UNPRIVILEGED_GID, UNPRIVILEGED_GID)
    os.setresuid(UNPRIVILEGED_UID, UNPRIVILEGED_UID, UNPRIVILEGED_UID)  # clears every capability
    _capset()
    return f"uid {UNPRIVILEGED_UID}, gid {UNPRIVILEGED_GID}"

"""The doors confinement closes beyond the network and writes (test_confinement.py): Unix sockets outside the
worker's scratch folder, writes under /dev beyond the device nodes, reads outside what the candidate needs, the
user it runs as, and what its exception text can carry out. Each exploit is rejected with the reason, and the harm
does not happen (the listener hears nothing, the file keeps its bytes, the secret is not in the verdict)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from hetforge.core.problem import Problem
from hetforge.optimizer import confine
from hetforge.optimizer import verdict as V
from hetforge.optimizer.judge import VerifyOptions, verify

HERE = Path(__file__).resolve().parent
PROBLEM = Problem(file=str(HERE / "problems" / "linear_relu.py"))
FAST = dict(trials=1, rounds=1, calls_per_round=2, warmup=1, threads=1, time=False)
LANDLOCK = confine._landlock_abi() >= 1


def _candidate(tmp_path: Path, name: str, **fields) -> Path:
    text = (HERE / "confinement" / f"{name}.py").read_text()
    for key, value in fields.items():
        text = text.replace("{" + key + "}", str(value))
    path = tmp_path / "candidates" / f"{name}.py"  # a folder of its own: the judge's files in tmp_path stay unread
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def _rejected_by_confinement(result: V.Verdict, fragment: str = "Permission denied") -> None:
    assert not result.accepted
    assert result.reasons[0].kind == V.RejectKind.CONFINEMENT, result.reasons
    assert fragment in result.reasons[0].message, result.reasons[0].message


class _UnixListener:
    """A Unix socket (stream or datagram) outside any worker's scratch folder, recording what reaches it."""

    def __init__(self, path: Path, kind: int):
        self.path, self.heard = path, []
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)  # as a careless service leaves it: only confinement stands in the way
        if kind == socket.SOCK_STREAM:
            self.sock.listen()
        threading.Thread(target=self._serve, args=(kind,), daemon=True).start()

    def _serve(self, kind: int) -> None:
        while True:
            try:
                if kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    self.heard.append(conn.recv(1024) or b"<connected>")
                    conn.close()
                else:
                    self.heard.append(self.sock.recv(1024))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def test_no_connect_to_a_unix_socket_outside_scratch(tmp_path):
    listener = _UnixListener(tmp_path / "service.sock", socket.SOCK_STREAM)
    try:
        result = verify(PROBLEM, _candidate(tmp_path, "connects_unix", path=listener.path), VerifyOptions(**FAST))
        time.sleep(0.2)
        assert listener.heard == []
    finally:
        listener.close()
    _rejected_by_confinement(result)


@pytest.mark.parametrize(
    "make",
    ["socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)", "socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0]"],
    ids=["socket", "socketpair"],
)
def test_no_datagram_to_a_unix_socket_outside_scratch(tmp_path, make):
    listener = _UnixListener(tmp_path / "service.sock", socket.SOCK_DGRAM)
    try:
        candidate = _candidate(tmp_path, "sends_unix_datagram", path=listener.path, make=make)
        result = verify(PROBLEM, candidate, VerifyOptions(**FAST))
        time.sleep(0.2)
        assert listener.heard == []
    finally:
        listener.close()
    _rejected_by_confinement(result)


@pytest.mark.skipif(not LANDLOCK, reason="needs Landlock")
def test_no_writes_into_existing_files_under_dev(tmp_path):
    target = Path("/dev/shm") / f"hetforge-test-{uuid.uuid4().hex}"
    if not target.parent.is_dir():
        pytest.skip("no /dev/shm on this host")
    target.write_bytes(b"original")
    try:
        result = verify(PROBLEM, _candidate(tmp_path, "writes_dev_file", target=target), VerifyOptions(**FAST))
        assert target.read_bytes() == b"original"
    finally:
        target.unlink()
    _rejected_by_confinement(result)


@pytest.mark.skipif(not LANDLOCK, reason="needs Landlock")
@pytest.mark.parametrize("what", ["shadow", "judge_file", "root_listing", "other_scratch"])
def test_no_reads_outside_what_the_candidate_needs(tmp_path, what):
    secret = "hunter2-" + uuid.uuid4().hex
    if what == "shadow":
        target = Path("/etc/shadow")
        if not target.exists():
            pytest.skip("no /etc/shadow")
    elif what == "judge_file":  # beside the candidate's folder: the judge's state, another candidate's source
        target = tmp_path / "registry.txt"
        target.write_text(secret)
    elif what == "root_listing":
        target = Path.home()
        if not os.access(target, os.R_OK):
            pytest.skip("the home folder is not listable even unconfined")
    else:  # a folder named like a worker's scratch (another worker's files)
        target = tmp_path / "hetforge-w1.1-candidate-xyz"
        target.mkdir()
        (target / "kernel.py").write_text(secret)
        target = target / "kernel.py"
    result = verify(PROBLEM, _candidate(tmp_path, "reads_file", target=target), VerifyOptions(**FAST))
    _rejected_by_confinement(result)
    assert secret not in result.to_json() and "contents:" not in result.to_json() and "listing:" not in result.to_json()


def test_exception_text_is_quoted_bounded_and_sanitized(tmp_path):
    result = verify(PROBLEM, _candidate(tmp_path, "loud_error"), VerifyOptions(**FAST))
    assert not result.accepted and result.reasons[0].kind == V.RejectKind.EXCEPTION, result.reasons
    message = result.reasons[0].message
    assert "RuntimeError:" in message and "red" in message  # the cause is still there to read
    assert "\x1b" not in message and "\n" not in message  # no terminal escapes, no forged lines
    assert len(message) < V.EXCERPT_CHARS + 100  # the judge's own words around the quoted excerpt


def test_excerpt_bounds_and_cleans():
    text = "a\x1b[31mb\n\tc" + "x" * 1000
    out = V.excerpt(text, 50)
    assert len(out) == 50 and out.startswith("a?[31mb c") and out.endswith("...")
    assert V.excerpt("short") == "short"


def test_workers_run_as_an_unprivileged_user_where_the_host_allows(tmp_path):
    """Generated code runs as uid 65534 where everything it must read is readable by that user; where not (here:
    Python lives under a root-only home), the verdict says which path kept it at uid 0, capabilities dropped."""
    result = verify(PROBLEM, _candidate(tmp_path, "reports_user"), VerifyOptions(**FAST))
    user = result.confinement.get("user", "")
    message = result.reasons[0].message
    if os.geteuid() != 0:
        assert user == f"uid {os.geteuid()}" and f"uid={os.geteuid()}" in message
    elif user.startswith(f"uid {confine.UNPRIVILEGED_UID}"):
        assert f"uid={confine.UNPRIVILEGED_UID} euid={confine.UNPRIVILEGED_UID}" in message
    else:
        assert "is not readable by uid" in user and "uid=0" in message, (user, message)
        blocked = user.split(": ", 1)[1].split(" is not readable")[0]
        assert not confine._reachable(blocked)


def test_reachable_follows_the_other_permission_bits():
    root = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp is world-traversable; pytest's tmp_path is not
    try:
        os.chmod(root, 0o755)
        folder = root / "private"
        folder.mkdir(mode=0o700)
        (folder / "f").write_text("x")
        os.chmod(folder / "f", 0o644)
        assert not confine._reachable(str(folder / "f"))
        os.chmod(folder, 0o755)
        assert confine._reachable(str(folder / "f"))
        os.chmod(folder / "f", 0o600)
        assert not confine._reachable(str(folder / "f"))
    finally:
        shutil.rmtree(root)

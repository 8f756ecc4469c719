"""The SQLite registry's integrity: missing, vanished, corrupt and unwritable files, backups, restore, reset."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time

import pytest

from hetforge import state
from hetforge.kernels.registry import Registry
from hetforge.serving.jobs import JobBoard
from hetforge.serving.swap_control import SwapError, request_swap
from hetforge.state import backup as backups
from hetforge.state.sqlite import SqliteStore, marker_of
from tests.conftest import run_cli
from tests.state.test_store import _add


@pytest.fixture
def reg_path(tmp_path):
    path = tmp_path / "home" / "registry.sqlite"
    yield path
    state.forget(path)


def _reopen(path) -> Registry:
    """The registry as a process starting now opens it (nothing cached from this one)."""
    state.forget(path)
    return Registry(path)


def test_a_missing_file_at_start_is_one_error_with_the_path_and_the_fix(reg_path):
    _add(Registry(reg_path), "kept")
    backups.backup(reg_path)
    reg_path.unlink()
    with pytest.raises(state.StoreMissing) as err:
        _reopen(reg_path)
    message = str(err.value)
    assert f"the registry {reg_path} is missing" in message
    assert "hetforge registry restore " + str(reg_path.parent / "backups") in message
    assert f"hetforge registry reset --registry {reg_path}" in message
    assert not reg_path.exists()  # not recreated empty


def test_the_first_use_creates_the_file_and_its_marker(reg_path):
    assert not reg_path.exists()
    Registry(reg_path)
    assert reg_path.exists() and marker_of(reg_path).exists()


def test_a_registry_written_before_migrations_opens_and_is_recorded_at_version_1(reg_path):
    from hetforge.kernels.registry import MIGRATIONS

    reg_path.parent.mkdir(parents=True)
    db = sqlite3.connect(reg_path)
    db.executescript(MIGRATIONS[0].sql)  # the tables as hetforge wrote them before `schema_migrations` existed
    db.execute(
        "INSERT INTO variants (fingerprint, device_class, precision, name, agent, source, recipe, signature, verdict,"
        " status, created_at, updated_at) VALUES ('fp', 'cpu', 'strict', 'old', 'test', '', '{}', '{}', '{}', 'active', 1, 1)"
    )
    db.commit()
    db.close()
    reg = Registry(reg_path)
    assert [v.name for v in reg.list()] == ["old"]
    assert reg.store.execute("SELECT version FROM schema_migrations WHERE component = 'registry'").fetchone()[0] == 1
    assert marker_of(reg_path).exists()


def test_a_file_that_vanishes_while_serving_is_detected_not_recreated(reg_path):
    reg, jobs = Registry(reg_path), JobBoard(reg_path)
    _add(reg, "v")
    reg_path.unlink()
    for call in (lambda: reg.list(), lambda: jobs.queue("p", "s", "hot", "", []), lambda: _add(reg, "w")):
        with pytest.raises(state.StoreMissing, match="is missing"):
            call()
    assert not reg_path.exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "emptied"])
def test_a_corrupt_file_at_start_is_one_error_with_the_path_and_the_fix(reg_path, damage):
    reg = Registry(reg_path)
    for i in range(200):  # enough pages that a truncation cuts through the tables
        _add(reg, f"v{i}")
    state.forget(reg_path)
    sqlite3.connect(reg_path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    data = reg_path.read_bytes()
    if damage == "truncated":
        reg_path.write_bytes(data[: len(data) // 2])
    elif damage == "overwritten":
        reg_path.write_bytes(b"not a database" * 1000)
    else:
        reg_path.write_bytes(b"")
    with pytest.raises(state.StoreCorrupt) as err:
        _reopen(reg_path)
    assert str(reg_path) in str(err.value) and "hetforge registry reset" in str(err.value)


def test_a_write_that_fails_is_an_error_with_its_cause(reg_path):
    Registry(reg_path)
    store = SqliteStore(reg_path, timeout_s=0.2)
    locker = sqlite3.connect(reg_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the file past the busy timeout
    try:
        with pytest.raises(state.StoreUnavailable, match="database is locked"):
            store.execute("UPDATE variants SET status = 'retired'")
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_an_unwritable_file_fails_writes_with_the_cause_and_still_reads(reg_path):
    reg = Registry(reg_path)
    kept = _add(reg, "kept")
    files = [str(p) for p in reg_path.parent.glob("registry.sqlite*")]
    if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (immutable files) needs root and a filesystem that supports it")
    try:
        with pytest.raises(state.StoreUnavailable, match="attempt to write a readonly database") as err:
            reg.set_status(kept.id, "retired")
        assert str(reg_path) in str(err.value)
        assert [v.name for v in reg.list()] == ["kept"]  # serving's lookups still work
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    assert reg.set_status(kept.id, "retired").status == "retired"


def test_the_swap_api_reports_a_store_failure_with_its_cause(reg_path, monkeypatch):
    Registry(reg_path)

    class Stage:
        name, kind = "s", "model"

    class Pipeline:
        name, stages = "p", [Stage()]

        def stage(self, name):
            return Stage()

    def unwritable(*args, **kwargs):
        raise state.StoreUnavailable(
            f"the registry {reg_path} refused the operation: attempt to write a readonly database"
        )

    monkeypatch.setattr("hetforge.serving.swap_control.SwapBoard.request", unwritable)
    with pytest.raises(SwapError) as err:
        request_swap(reg_path, Pipeline(), "s", "reference", 1, 1)
    assert err.value.status == 503 and "readonly database" in err.value.message and str(reg_path) in err.value.message


def test_an_online_backup_while_writing_then_restore(reg_path):
    reg = Registry(reg_path)
    _add(reg, "first")
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            _add(reg, f"bg{i}")
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.2)
        made = [backups.backup(reg_path, keep=2) for _ in range(3)]
    finally:
        stop.set()
        writer.join(timeout=60)
    kept = sorted((reg_path.parent / "backups").glob("registry-*.sqlite"))
    assert kept == made[1:]  # the newest two
    assert not list((reg_path.parent / "backups").glob("*.tmp*")) and not list(kept[0].parent.glob("*-wal"))
    in_backup = sqlite3.connect(made[-1]).execute("SELECT COUNT(*) FROM variants").fetchone()[0]
    assert 1 <= in_backup <= len(reg.list())
    _add(reg, "after-backup")
    aside = backups.restore(reg_path, made[-1])
    assert aside is not None and aside.exists()
    restored = _reopen(reg_path)
    names = [v.name for v in restored.list()]
    assert names[0] == "first" and "after-backup" not in names and len(names) == in_backup
    _add(restored, "writable")  # the restored file is a working registry


def test_scheduled_backups_keep_the_newest(reg_path):
    _add(Registry(reg_path), "v")
    schedule = backups.Schedule(reg_path, every_s=0.1, keep=2).start()
    folder = reg_path.parent / "backups"
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("registry-*.sqlite"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        first = sorted(folder.glob("registry-*.sqlite"))[0]
        while first.exists() and time.monotonic() < deadline:  # a third run prunes the oldest
            time.sleep(0.1)
    finally:
        schedule.stop()
    assert schedule.last_error == "" and schedule.last is not None
    assert not first.exists() and len(list(folder.glob("registry-*.sqlite"))) == 2


def test_restore_refuses_what_is_not_a_registry_backup(reg_path, tmp_path):
    Registry(reg_path)
    junk = tmp_path / "junk.sqlite"
    sqlite3.connect(junk).execute("CREATE TABLE t (x)").close()
    with pytest.raises(state.StoreCorrupt, match="holds no registry"):
        backups.restore(reg_path, junk)
    with pytest.raises(backups.BackupError, match="PostgreSQL"):
        backups.backup("postgresql://hetforge@db/hetforge")


def test_cli_backup_check_restore_reset(tmp_path):
    env = {"HETFORGE_HOME": str(tmp_path), "HETFORGE_STATE_URL": ""}
    path = tmp_path / "registry.sqlite"
    _add(Registry(path), "kept")
    state.forget(path)
    done = run_cli("registry", "backup", env=env)
    assert done.returncode == 0, done.stderr
    made = done.stdout.split(" to ")[-1].strip()
    path.unlink()
    missing = run_cli("kernels", "list", env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and f"hetforge registry restore {made}" in missing.stderr
    restored = run_cli("registry", "restore", made, env=env)
    assert restored.returncode == 0, restored.stderr
    check = run_cli("registry", "check", "--json", env=env)
    assert check.returncode == 0, check.stderr
    assert '"variants": 1' in check.stdout and '"registry": 1' in check.stdout
    assert run_cli("registry", "reset", env=env).returncode == 2  # needs --yes
    reset = run_cli("registry", "reset", "--yes", env=env)
    assert reset.returncode == 0 and "previous file is" in reset.stdout
    assert '"variants": 0' in run_cli("registry", "check", "--json", env=env).stdout

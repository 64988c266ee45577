"""service/gunicorn.conf.py's hooks for the folders its workers share, called as gunicorn calls
them (loading the file, then when_ready once the sockets are bound, pre_exec before a USR2
upgrade re-executes, on_exit at shutdown) on a stand-in for gunicorn's arbiter."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

CONFIG = Path(__file__).resolve().parents[2] / "service" / "gunicorn.conf.py"
VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "CAPTIONER_RUNTIME_DIR", "CAPTIONER_MADE_FOLDERS", "CAPTIONER_WORKERS")


@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """TMPDIR for the configuration; its variables unset, and restored afterwards."""
    for name in VARIABLES:  # the hooks set them: monkeypatch restores what it has recorded
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile caches the folder it chose
    return tmp_path


def made(temp: Path) -> list[Path]:
    """The folders the configuration made in `temp` (libraries may keep caches there too)."""
    return sorted(p for p in temp.iterdir() if p.name.startswith("captioner-"))


def arbiter(reexec_pid: int = 0, master_pid: int = 0) -> SimpleNamespace:
    return SimpleNamespace(reexec_pid=reexec_pid, master_pid=master_pid, cfg=SimpleNamespace(env_orig={}))


def test_folders_are_made_once_bound_and_removed_at_shutdown(temp):
    hooks = runpy.run_path(str(CONFIG))
    assert made(temp) == []  # loading makes nothing: a start that cannot bind leaves nothing
    master = arbiter()
    hooks["when_ready"](master)
    folders = made(temp)
    assert [p.name.rsplit("-", 1)[0] for p in folders] == ["captioner-metrics", "captioner-runtime"]
    assert sorted(os.environ["CAPTIONER_MADE_FOLDERS"].split(os.pathsep)) == [str(p) for p in folders]
    hooks["on_exit"](master)
    assert made(temp) == []


def test_an_upgrade_hands_the_folders_to_the_new_master(temp, monkeypatch):
    hooks = runpy.run_path(str(CONFIG))
    old = arbiter()
    hooks["when_ready"](old)
    folders = made(temp)
    old.reexec_pid = 4242  # USR2: the new master runs beside the old one
    hooks["pre_exec"](old)
    handed = old.cfg.env_orig
    assert handed["CAPTIONER_MADE_FOLDERS"] == os.environ["CAPTIONER_MADE_FOLDERS"]
    assert {handed["PROMETHEUS_MULTIPROC_DIR"], handed["CAPTIONER_RUNTIME_DIR"]} == {str(p) for p in folders}
    hooks["on_exit"](old)  # the old master stops: the new one still uses them
    assert made(temp) == folders

    for name, value in handed.items():  # the new master, re-executed with that environment
        monkeypatch.setenv(name, value)
    (folders[0] / "counter_1.db").write_bytes(b"the old workers' values")
    new_hooks = runpy.run_path(str(CONFIG))
    new = arbiter(master_pid=os.getppid())  # its parent, the old master, still runs
    new_hooks["when_ready"](new)
    assert made(temp) == folders and (folders[0] / "counter_1.db").exists()
    new.master_pid = 0  # the old master has gone
    new_hooks["on_exit"](new)
    assert made(temp) == []


def test_folders_given_are_kept_and_cleared_of_an_earlier_run(temp, monkeypatch):
    given = temp / "metrics"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"an earlier run")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    monkeypatch.setenv("CAPTIONER_MADE_FOLDERS", str(given))  # inherited from some other server: not trusted
    hooks = runpy.run_path(str(CONFIG))
    master = arbiter()
    hooks["when_ready"](master)
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    hooks["on_exit"](master)
    assert given.is_dir() and made(temp) == []

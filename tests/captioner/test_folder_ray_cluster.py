"""`captioner caption-folder --engine ray` on a real two-node Ray cluster: `ray start --head` plus
a second `ray start --address` on this machine (one for the module), driven by the command in a
subprocess. An actor process killed mid-run is restarted by Ray and its batch redone; the whole
job killed and run again finishes the rest; either way one record per photo, none twice.

The nodes listen on 127.0.0.2, a loopback address that Ray, unlike 127.0.0.1, does not replace
by the machine's network address: nothing leaves the machine. Every process of the cluster has
the module's own RAY_AUTH_TOKEN in its environment, and a node's workers CAPTIONER_TEST_NODE: that
is how the tests find an actor's process, and how teardown finds anything left over."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_photo, require_module

FAST = ["--max-new-tokens", "4", "--num-beams", "2", "--batch-size", "2", "--precision", "fp32"]
INSTALL = "pip install 'captioner[ray]'"
ROOT = Path(__file__).resolve().parents[2]
IP = "127.0.0.2"
PHOTOS = 24

# Two Ray nodes and the command in subprocesses; starting the cluster, the runs and their restarts
# each wait up to minutes on a slow machine: a longer timeout than the suite's.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((IP, 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    address: str
    driver_env: dict[str, str]
    token: str

    def processes(self, title: str) -> dict[int, str]:
        """This cluster's processes whose title (Ray renames its workers: ray::MapWorker(...))
        contains `title`, each with the name of its node."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"RAY_AUTH_TOKEN={self.token}".encode() in environ and title.encode() in cmdline:
                node = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"CAPTIONER_TEST_NODE=")), "")
                found[int(pid)] = node
        return found


def using(folder: str) -> set[int]:
    """Processes with a file open under `folder` (Ray's agents keep their logs in the session
    folder, and their environment is not always the node's)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(link.startswith(folder + "/") for link in links):
            found.add(int(pid))
    return found


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((IP, port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the head did not start in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_module("ray", install=INSTALL)
    logs = tmp_path_factory.mktemp("cluster")
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # nothing in ~/.ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM ends a node at once
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's sockets live under it
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus=2", "--object-store-memory=150000000", "--disable-usage-stats",
              f"--node-ip-address={IP}", "--block"]
    nodes: list[subprocess.Popen] = []
    handles = []
    try:
        for name, args in (
            ("head", ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                      f"--ray-client-server-port={free_port()}"]),
            ("worker", [f"--address={IP}:{port}"]),
        ):
            log = logs / f"{name}.log"
            handles.append(open(log, "w"))
            # --block keeps `ray start` in the foreground as the parent of the node's processes:
            # ending it ends them.
            nodes.append(subprocess.Popen(
                [ray_cli, "start", *args, *common, f"--dashboard-agent-listen-port={free_port()}",
                 f"--metrics-export-port={free_port()}"],
                env={**env, "CAPTIONER_TEST_NODE": name}, stdout=handles[-1], stderr=subprocess.STDOUT,
                start_new_session=True))
            if name == "head":  # the worker may start as soon as the head's GCS answers
                wait_for_port(port, nodes[-1], log)
        for name, node in zip(("head", "worker"), nodes):
            wait_for_line(logs / f"{name}.log", "Ray runtime started", node)
        driver_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver_env.update(token)
        yield Cluster(f"{IP}:{port}", driver_env, token["RAY_AUTH_TOKEN"])
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        left = set(Cluster("", {}, token["RAY_AUTH_TOKEN"]).processes("")) | using(temp)
        for pid in left - {os.getpid()}:  # anything of this cluster still alive, by its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
        for handle in handles:
            handle.close()


def photo_folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        (folder / f"photo_{i:03d}.jpg").write_bytes(make_photo(160, 120, seed=i))
    return folder


def start(cluster: Cluster, folder: Path, out: Path, checkpoint: str, log: Path, actors: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner.cli", "caption-folder", str(folder), "-o", str(out),
               "--engine", "ray", "--address", cluster.address, "--actors", str(actors), "--shard-size", "2",
               "--checkpoint", checkpoint, *FAST]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=cluster.driver_env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def committed_records(out: Path) -> list[dict]:
    """The records of OUT's committed shards (temporary names excluded), shard by shard."""
    shards = Path(str(out) + ".shards")
    if not shards.is_dir():
        return []
    records = []
    for shard in sorted(shards.glob("part-*.jsonl")):
        records.extend(json.loads(line) for line in shard.read_text().splitlines())
    return records


def wait_for_records(process: subprocess.Popen, out: Path, log: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(committed_records(out)) < count:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no shards in time:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def end(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def assert_one_record_each(out: Path, folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == names
    assert all(r["caption"] and isinstance(r["score"], float) for r in records)
    assert sorted(r["path"] for r in committed_records(out)) == names  # no shard holds a photo twice


def test_an_actor_killed_mid_run_is_restarted_and_its_batch_redone(cluster, tiny_checkpoint, tmp_path):
    folder, out, log = photo_folder(tmp_path, PHOTOS), tmp_path / "captions.jsonl", tmp_path / "run.log"
    process = start(cluster, folder, out, tiny_checkpoint, log)
    try:
        wait_for_records(process, out, log, 2)
        actors = cluster.processes("CaptionActor")
        assert sorted(actors.values()) == ["head", "worker"]  # one model actor on each node
        victim = min(actors)
        os.kill(victim, signal.SIGKILL)
        at_kill = len(committed_records(out))
        restarted = set()
        while process.poll() is None and not restarted:
            restarted = set(cluster.processes("CaptionActor")) - set(actors)
            time.sleep(0.05)
        assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        end(process)
    assert at_kill < PHOTOS, "the run should still have been going"
    assert restarted, "Ray should have started a new actor process"
    assert_one_record_each(out, folder)
    assert f"captioned {PHOTOS}, failed 0" in log.read_text()


def test_the_whole_job_killed_and_run_again_finishes_the_rest(cluster, tiny_checkpoint, tmp_path):
    folder, out, log = photo_folder(tmp_path, PHOTOS), tmp_path / "captions.jsonl", tmp_path / "run.log"
    process = start(cluster, folder, out, tiny_checkpoint, log, actors=1)  # one model loads faster
    try:
        wait_for_records(process, out, log, 4)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and everything in its session
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        end(process)
    shards = {p.name: p.read_bytes() for p in Path(str(out) + ".shards").glob("part-*.jsonl")}
    done = len(committed_records(out))
    assert 4 <= done < PHOTOS and not out.exists()  # OUT is rendered once every shard is in

    rerun = start(cluster, folder, out, tiny_checkpoint, tmp_path / "rerun.log", actors=1)
    try:
        assert rerun.wait(timeout=180) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        end(rerun)
    assert f"captioned {PHOTOS - done}, failed 0, skipped 0 (not images, or hidden), {done} already in OUT" in (
        tmp_path / "rerun.log").read_text()
    assert {name: Path(str(out) + ".shards", name).read_bytes() for name in shards} == shards  # kept as they were
    assert_one_record_each(out, folder)

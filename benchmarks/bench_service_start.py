"""How fast the service starts and replaces a worker, and the memory its processes hold.

    python benchmarks/bench_service_start.py [--checkpoint PATH] [--workers 2] [--kills 3]

A real gunicorn (service/gunicorn.conf.py, as `bench_service.py` starts it):
1. start: seconds from launching gunicorn with one worker to `/readyz` answering 200;
2. replacement: its worker is killed (SIGKILL) --kills times; seconds from each kill to the new
   worker answering `/readyz` (one worker, so that no other answers for it). The master imports PyTorch, timm and Pillow before it forks, so
   a replacement pays only for our code and the model. The reference, measured in the same run:
   a fresh interpreter importing those libraries, which each worker would pay without them;
3. memory: proportional set size (PSS, shared pages divided among the processes that map them)
   of the master and its workers, summed, for a second server with --workers.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_service import Server  # noqa: E402

MASTER_IMPORTS = "import PIL.Image, timm"  # as service/gunicorn.conf.py


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def replacement_s(server: Server, timeout: float = 120) -> float:
    """Kill one worker; seconds until a worker started after the kill answers /readyz."""
    before = children(server.process.pid)
    victim = min(before)
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while time.monotonic() - started < timeout:
        if children(server.process.pid) - before:
            try:
                if requests.get(server.url + "/readyz", timeout=1).status_code == 200 and \
                        len(children(server.process.pid)) == len(before):
                    return time.monotonic() - started
            except requests.RequestException:
                pass
        time.sleep(0.02)
    raise SystemExit(f"no worker replaced the killed one in {timeout} s")


def fresh_import_s() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", MASTER_IMPORTS], check=True)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "captioner" / "weights" / "default.pt")
    parser.add_argument("--workers", type=int, default=2, help="workers of the server whose memory is measured")
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)

    def serve(workers: int) -> Server:
        return Server(args.checkpoint, max_batch_size=16, max_wait_ms=5, threads=16, workers=workers,
                      torch_threads=None)

    started = time.monotonic()
    server = serve(1)
    try:
        start_s = time.monotonic() - started
        replacements = [replacement_s(server) for _ in range(args.kills)]
    finally:
        server.close()
    server = serve(args.workers)
    try:
        pids = [server.process.pid, *sorted(children(server.process.pid))]
        memory = {pid: pss_mb(pid) for pid in pids}
    finally:
        server.close()
    imports = [fresh_import_s() for _ in range(args.kills)]

    replaced, reference = min(replacements), min(imports)
    print(f"start to ready: {start_s:.2f} s (one worker)")
    print(f"a killed worker replaced and ready: {', '.join(f'{s:.2f}' for s in replacements)} s "
          f"(a fresh interpreter's `{MASTER_IMPORTS}` alone: {', '.join(f'{s:.2f}' for s in imports)} s; "
          f"best {replaced / reference:.2f}x of it)")
    print("PSS: " + ", ".join(f"{'master' if pid == pids[0] else 'worker'} {mb:.0f} MB" for pid, mb in memory.items())
          + f"; {sum(memory.values()):.0f} MB in all ({args.workers} workers)")
    print(json.dumps({
        "start_s": round(start_s, 3), "worker_replacement_s": round(replaced, 3),
        "fresh_library_import_s": round(reference, 3), "replacement_over_fresh_import": round(replaced / reference, 3),
        "pss_mb_total": round(sum(memory.values()), 1), "workers": args.workers,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

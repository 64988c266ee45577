"""Peak memory of `captioner caption-folder --engine ray` for folders of different sizes: streaming
execution should keep it flat (decoded pixels are held only a few batches ahead of the model).

    python benchmarks/bench_folder_memory.py [--sizes 200,2000] [--checkpoint PATH] [--data DIR]
                                             [--batch-size 32] [--num-beams 3]

For each size, makes a folder of that many JPEGs (hard links to the Flickr8k photos listed in
../shared/data/flickr8k/original_aspect.txt, cycled; `--data` for another folder) and runs the
command in a subprocess, which starts Ray on this machine. Every 0.2 s it sums the proportional
set size (PSS, /proc/PID/smaps_rollup: shared pages such as Ray's object store counted once) of
the command and every process under it: the driver, Ray's GCS and raylet, the decoding workers
and the model actor. The peak of that sum, and the driver's own peak, are printed per size; the
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_CHECKPOINT = ROOT / "captioner" / "weights" / "default.pt"


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str]) -> dict:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"total": 0, "driver": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = descendants(process.pid)
            sizes = {pid: pss_kib(pid) for pid in pids}
            peak["total"] = max(peak["total"], sum(sizes.values()))
            peak["driver"] = max(peak["driver"], sizes.get(process.pid, 0))
            peak["processes"] = max(peak["processes"], len(pids))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    _, err = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"caption-folder failed ({process.returncode}):\n{err[-3000:]}")
    return {"peak_total_mib": round(peak["total"] / 1024, 1), "peak_driver_mib": round(peak["driver"] / 1024, 1),
            "processes": peak["processes"], "wall_s": round(time.perf_counter() - start, 1)}


def make_folder(folder: Path, count: int, data: Path | None) -> None:
    if data is None:
        sources = [FLICKR / "images" / n for n in (FLICKR / "original_aspect.txt").read_text().split()]
    else:
        sources = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    folder.mkdir(parents=True)
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / f"{i:06d}_{source.name}"
        try:
            os.link(source, target)
        except OSError:  # another filesystem
            target.write_bytes(source.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200,2000")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=3)
    args = parser.parse_args()
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as temporary:
        for size in map(int, args.sizes.split(",")):
            folder = Path(temporary) / f"photos{size}"
            make_folder(folder, size, args.data)
            command = [sys.executable, "-m", "captioner.cli", "caption-folder", str(folder),
                       "-o", str(Path(temporary) / f"captions{size}.jsonl"), "--engine", "ray", "--quiet",
                       "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
                       "--num-beams", str(args.num_beams)]
            results[size] = measure(command)
            row = results[size]
            print(f"{size:>6} photos  peak {row['peak_total_mib']:8.1f} MiB in all {row['processes']} processes, "
                  f"driver {row['peak_driver_mib']:7.1f} MiB, {row['wall_s']:.1f} s")
    sizes = sorted(results)
    print(json.dumps({"peak_total_mib": {str(k): results[k]["peak_total_mib"] for k in sizes},
                      "peak_driver_mib": {str(k): results[k]["peak_driver_mib"] for k in sizes},
                      "growth": round(results[sizes[-1]]["peak_total_mib"] / results[sizes[0]]["peak_total_mib"], 3),
                      "batch_size": args.batch_size, "num_beams": args.num_beams, "checkpoint": str(checkpoint)}))


if __name__ == "__main__":
    main()

"""Throughput and latency of the HTTP service under concurrency, next to the library's own
batched throughput on the same image bytes, measured in the same run.

    python benchmarks/bench_service.py [--checkpoint PATH] [--images 32] [--duration 10]
                                       [--clients 1,4,16] [--max-batch-size 16] [--max-wait-ms 5]

1. Library: `Captioner.caption(list of JPEG bytes, batch_size=16)` (decoding included, as in the
   service), after one warm-up batch, with --torch-threads (default: every core); measured before
   and after the service runs and averaged, since the machine may be shared.
2. Service: a real gunicorn (service/gunicorn.conf.py with its defaults: one worker per 4 cores,
   cores / workers torch threads each, 16 request threads; --workers and --service-torch-threads
   override) on a free loopback port, once with micro-batching on (--max-batch-size) and once
   off (batch size 1). For each N in --clients, N threads POST the images round-robin (raw JPEG
   body, default decoding: beam search with 3 beams) for --duration seconds after a warm-up;
   requests/s, p50/p99 latency, and the mean batch size from /metrics (summed over workers).

Images: the Flickr8k photos in ../shared/data/flickr8k (first --images of original_aspect.txt)
when present, else smooth random 500x375 JPEGs. The model is the bundled default
(captioner/weights/default.pt); while it does not exist, a checkpoint of the same architecture
(training/configs/flickr8k.yaml decoder, 2,600 words) with a random decoder is built: it runs at
the same speed. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from stand_in import default_size_checkpoint  # noqa: E402
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_CHECKPOINT = ROOT / "captioner" / "weights" / "default.pt"


def load_images(count: int) -> tuple[list[bytes], str]:
    listing = FLICKR / "original_aspect.txt"
    if listing.is_file():
        names = listing.read_text().split()[:count]
        return [(FLICKR / "images" / name).read_bytes() for name in names], f"Flickr8k ({len(names)} photos)"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images, f"synthetic 500x375 JPEGs ({count})"


def library_throughput(model, images: list[bytes], batch_size: int = 16, rounds: int = 2) -> float:
    model.caption(images[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        model.caption(images, batch_size=batch_size)
    return rounds * len(images) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, max_batch_size: int, max_wait_ms: float, threads: int,
                 workers: int | None, torch_threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CAPTIONER_CHECKPOINT": str(checkpoint), "CAPTIONER_BIND": f"127.0.0.1:{self.port}",
               "CAPTIONER_THREADS": str(threads),
               "CAPTIONER_MAX_BATCH_SIZE": str(max_batch_size), "CAPTIONER_MAX_WAIT_MS": str(max_wait_ms),
               "CAPTIONER_ACCESS_LOG": "", "CAPTIONER_LOG_LEVEL": "warning"}
        for name, value in (("CAPTIONER_WORKERS", workers), ("CAPTIONER_TORCH_THREADS", torch_threads)):
            env.pop(name, None)
            if value:
                env[name] = str(value)
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "service" / "gunicorn.conf.py"), "service:create_app()"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit("gunicorn exited:\n" + self.log.read().decode()[-3000:])
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit("gunicorn did not become ready in 120 s")
            time.sleep(0.25)

    def batch_sizes(self) -> tuple[float, float]:
        """(images, batches) so far, from /metrics."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("captioner_batch_size_sum", "captioner_batch_size_count"))}
        return values.get("captioner_batch_size_sum", 0.0), values.get("captioner_batch_size_count", 0.0)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def drive(url: str, images: list[bytes], clients: int, duration: float, warmup: float) -> dict:
    """`clients` threads post images back to back; statistics over the measured window."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    start_at = time.monotonic() + warmup
    stop_at = start_at + duration

    def client(index: int) -> None:
        session = requests.Session()
        i = index
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            response = session.post(url + "/v1/captions", data=images[i % len(images)],
                                    headers={"Content-Type": "image/jpeg"}, timeout=120)
            done = time.monotonic()
            i += clients
            if sent >= start_at:
                with lock:
                    if response.status_code == 200:
                        latencies.append(done - sent)
                    else:
                        failures.append(response.status_code)
        session.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window = max(max(stop_at, time.monotonic()) - start_at, 1e-9)  # requests finishing after stop count
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": len(failures),
        "rps": len(latencies) / window,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
    }


def main() -> None:
    from captioner.runtime.cpu import keep_freed_memory

    keep_freed_memory()  # the library here under the allocator settings the CLI uses
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=16, help="gunicorn request threads")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--torch-threads", type=int, default=cores,
                        help="the library's torch threads (default: every core)")
    parser.add_argument("--workers", type=int, default=None,
                        help="gunicorn workers (default: the service's, one per 4 cores)")
    parser.add_argument("--service-torch-threads", type=int, default=None,
                        help="torch threads per worker (default: the service's, cores / workers)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    workers = args.workers or max(1, cores // 4)  # the default of service/gunicorn.conf.py

    from captioner.api import Captioner

    torch.set_num_threads(args.torch_threads)
    temporary = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    model_note = str(checkpoint)
    if not checkpoint.is_file():
        checkpoint = default_size_checkpoint(Path(temporary.name) / "default-size.pt")
        model_note = "default architecture with a random decoder (bundled model not present yet)"
    images, image_note = load_images(args.images)
    print(f"model: {model_note}\nimages: {image_note}\ncpu cores: {cores}, "
          f"library torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.2f}")

    model = Captioner.from_checkpoint(checkpoint)
    library = [library_throughput(model, images)]
    print(f"library caption(batch_size=16): {library[0]:.2f} images/s")
    del model

    results: dict[str, list[dict]] = {}
    for mode, batch in (("on", args.max_batch_size), ("off", 1)):
        server = Server(checkpoint, batch, args.max_wait_ms, args.threads, args.workers, args.service_torch_threads)
        try:
            results[mode] = []
            for clients in levels:
                before = server.batch_sizes()
                row = drive(server.url, images, clients, args.duration, args.warmup)
                after = server.batch_sizes()
                row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                results[mode].append(row)
                print(f"  batching {mode:3} c={clients:<3} {row['rps']:6.2f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:.1f}  failures {row['failures']}")
        finally:
            server.close()

    model = Captioner.from_checkpoint(checkpoint)
    library.append(library_throughput(model, images))
    library_ips = sum(library) / len(library)
    print(f"library caption(batch_size=16), again: {library[1]:.2f} images/s; mean {library_ips:.2f}")

    print("\n| batching | clients | req/s | p50 ms | p99 ms | mean batch | vs library |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("on", "off"):
        for row in results[mode]:
            print(f"| {mode} | {row['clients']} | {row['rps']:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
                  f"{row['mean_batch']:.1f} | {row['rps'] / library_ips:.2f}x |")
    print(f"| library caption(), batches of 16 | | {library_ips:.2f} images/s | | | 16 | 1.00x |")

    top = max(levels)
    on = next(r for r in results["on"] if r["clients"] == top)
    off = next(r for r in results["off"] if r["clients"] == top)
    summary = {
        "library_images_per_s": round(library_ips, 3),
        f"service_rps_c{top}": round(on["rps"], 3),
        f"service_over_library_c{top}": round(on["rps"] / library_ips, 3),
        f"batching_on_over_off_c{top}": round(on["rps"] / max(off["rps"], 1e-9), 3),
        f"p99_ms_c{top}": round(on["p99_ms"], 1),
        f"p50_ms_c{top}": round(on["p50_ms"], 1),
        f"service_rps_c{top}_batching_off": round(off["rps"], 3),
        "library_torch_threads": args.torch_threads,
        "service_workers": workers,
        "service_torch_threads_per_worker": args.service_torch_threads or max(1, cores // workers),
        "model": model_note,
        "images": image_note,
    }
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()

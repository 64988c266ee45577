"""`captioner serve`: the HTTP service under gunicorn (or Flask's development server with --dev).

    captioner serve [--host 127.0.0.1 --port 8000 --workers N --threads 16 --checkpoint PATH]
    captioner serve --model v1=runs/a/best.pt --model v2=runs/b/best.pt   # several; v1 answers by default

Flags become CAPTIONER_* environment variables read by `service/gunicorn.conf.py` and
`create_app`, so the command line, `docker run -e` and a plain `gunicorn` call agree.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

GUNICORN_CONF = Path(__file__).with_name("gunicorn.conf.py")


def register(commands) -> None:
    serve = commands.add_parser("serve", help="run the HTTP captioning service",
                                description="Run the HTTP API and web page under gunicorn.")
    serve.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    serve.add_argument("--workers", type=int, default=None, help="gunicorn worker processes, each with cores/workers torch threads (default: one per 4 cores)")
    serve.add_argument("--threads", type=int, default=None, help="request threads per worker (default: 16)")
    serve.add_argument("--checkpoint", default=None, help="model checkpoint (default: the bundled model)")
    serve.add_argument("--model", action="append", default=None, metavar="NAME=PATH",
                       help="serve this checkpoint as NAME (repeat for several; the first is the default; "
                            "requests pick one with model=NAME)")
    serve.add_argument("--cells", default=None, metavar="PATH",
                       help="the default model's ranked units for the web page's under-the-hood view "
                            "(captioner cells --units-file; default: <checkpoint stem>.cells.json or "
                            "cells.json beside the checkpoint)")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    serve.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "int8"),
                       help="the encoder's inference path (default: auto, the fastest this CPU runs natively "
                            "whose captions were measured to hold)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="images per micro-batch; 1 turns batching off (default: 16)")
    serve.add_argument("--max-wait-ms", type=float, default=None,
                       help="how long a batch waits for the images of requests being decoded (default: 5)")
    serve.add_argument("--rate-limit", default=None, metavar="RATE[,BURST]",
                       help="requests/second (and burst) per API key, or per client address without keys")
    serve.add_argument("--drain-s", type=float, default=None,
                       help="after SIGTERM, keep answering this long before closing the socket (default: 5)")
    serve.add_argument("--dev", action="store_true", help="Flask's development server, one process")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    settings = {"HOST": args.host, "PORT": args.port, "WORKERS": args.workers, "THREADS": args.threads,
                "CHECKPOINT": args.checkpoint, "CELLS": args.cells, "DEVICE": args.device, "PRECISION": args.precision,
                "MAX_BATCH_SIZE": args.max_batch_size, "MAX_WAIT_MS": args.max_wait_ms,
                "MODELS": ",".join(args.model) if args.model else None,
                "RATE_LIMIT": args.rate_limit, "DRAIN_S": args.drain_s}
    for name, value in settings.items():
        if value is not None:
            env[f"CAPTIONER_{name}"] = str(value)
    paths = [args.checkpoint] if args.checkpoint else [item.partition("=")[2] for item in args.model or []]
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path or '(none)'} does not exist")
    if args.dev:
        os.environ.update(env)
        from . import create_app

        host = env.get("CAPTIONER_HOST", "127.0.0.1")
        app = create_app()
        models = app.extensions["captioner"].models
        # SIGHUP reloads the models whose files changed, as it does in a gunicorn worker.
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=models.reload_all, daemon=True).start())
        app.run(host=host, port=int(env.get("CAPTIONER_PORT", "8000")), threaded=True)
        return 0
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "service:create_app()"]
    os.execve(sys.executable, command, env)  # gunicorn takes over this process (and its signals)
    return 0

"""`captioner serve`: the HTTP service under gunicorn (or Flask's development server with --dev).

    captioner serve [--host 127.0.0.1 --port 8000 --workers N --threads 16 --checkpoint PATH]

Flags become CAPTIONER_* environment variables read by `service/gunicorn.conf.py` and
`create_app`, so the command line, `docker run -e` and a plain `gunicorn` call agree.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="images per micro-batch; 1 turns batching off (default: 16)")
    serve.add_argument("--max-wait-ms", type=float, default=None,
                       help="how long a batch waits to fill (default: 5)")
    serve.add_argument("--dev", action="store_true", help="Flask's development server, one process")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    settings = {"HOST": args.host, "PORT": args.port, "WORKERS": args.workers, "THREADS": args.threads,
                "CHECKPOINT": args.checkpoint, "DEVICE": args.device,
                "MAX_BATCH_SIZE": args.max_batch_size, "MAX_WAIT_MS": args.max_wait_ms}
    for name, value in settings.items():
        if value is not None:
            env[f"CAPTIONER_{name}"] = str(value)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    if args.dev:
        os.environ.update(env)
        from . import create_app

        host = env.get("CAPTIONER_HOST", "127.0.0.1")
        create_app().run(host=host, port=int(env.get("CAPTIONER_PORT", "8000")), threaded=True)
        return 0
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "service:create_app()"]
    os.execve(sys.executable, command, env)  # gunicorn takes over this process (and its signals)
    return 0

"""gunicorn settings for `gunicorn -c service/gunicorn.conf.py 'service:create_app()'`.

Every value comes from the environment, so `captioner serve` and `docker run -e ...` configure the
same file. No `preload_app`: each worker loads the model itself in `create_app`, after the fork
(PyTorch's thread pools do not survive a fork); the master only imports the heavy libraries, so
the workers fork with them. Each worker gets cores / workers torch threads unless
CAPTIONER_TORCH_THREADS says otherwise.
"""

import os

# The heavy libraries are imported once, here in the master, so every worker (at start, after a
# crash, in a rolling restart) forks with them: a replacement worker served 0.8-1.2 s after its
# predecessor was killed instead of 5.9-6.1 s, and two workers' memory (PSS, master included) was
# 0.9 GB instead of 1.3 (the imports' pages are shared; benchmarks/bench_service_start.py, AVX2
# EPYC, 2 cores). Imports only: no tensor work runs in the master, so it has no thread pool for
# the fork to break; our own code (service, captioner) and the model still load in each worker,
# so SIGHUP picks up new versions of them. New versions of these libraries need a new master: a
# restart, or USR2.
import PIL.Image  # noqa: F401
import timm  # noqa: F401  (imports torch and torchvision)

bind = os.environ.get("CAPTIONER_BIND", "{}:{}".format(os.environ.get("CAPTIONER_HOST", "127.0.0.1"),
                                                       os.environ.get("CAPTIONER_PORT", "8000")))
# One worker per 4 cores by default (one on small machines): each worker micro-batches on its own
# and gives its few torch threads to the convolutions, while the decoder's small per-step
# operations never wait on a large thread team. On this project's 2-core machine one worker serves
# 0.92x to 0.99x the library's own batched throughput at 16 clients (benchmarks/bench_service.py).
workers = int(os.environ.get("CAPTIONER_WORKERS") or 0) or max(1, len(os.sched_getaffinity(0)) // 4)
# Request threads per worker: they decode images in parallel and wait on the micro-batcher.
threads = int(os.environ.get("CAPTIONER_THREADS", "16"))
# gthread, plus a drain after SIGTERM (answer for CAPTIONER_DRAIN_S, then close the socket) and a
# model reload on SIGHUP to a worker: service/worker.py.
worker_class = "service.worker.DrainingWorker"
preload_app = False
timeout = int(os.environ.get("CAPTIONER_WORKER_TIMEOUT", "120"))  # covers loading the model
# After SIGTERM the master waits this long for its workers: the drain, then the requests in flight.
graceful_timeout = int(float(os.environ.get("CAPTIONER_DRAIN_S") or 5)
                       + float(os.environ.get("CAPTIONER_REQUEST_TIMEOUT_S") or 30) + 5)
keepalive = 5
backlog = 256
limit_request_line = 8190
limit_request_fields = 100
# The service writes its own structured access log (one JSON line per request, with the request
# id, model and batch size; CAPTIONER_ACCESS_LOG=false turns it off); gunicorn's stays off.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("CAPTIONER_LOG_LEVEL", "info")
proc_name = "captioner"
control_socket_disable = True  # gunicorn's control socket (in $HOME): not used, and one per host
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

# Read by create_app in each worker: torch threads share the cores among workers.
os.environ["CAPTIONER_WORKERS"] = str(workers)
# Folders the workers share: Prometheus metrics summed over the workers (each worker writes its
# values to files there; /metrics reads them all), and the rate limits' token buckets. A folder
# not given is made in `when_ready` and listed in CAPTIONER_MADE_FOLDERS; the last master to use
# it removes it when it shuts down (`on_exit`).
SHARED_FOLDERS = (("PROMETHEUS_MULTIPROC_DIR", "captioner-metrics-", ".db"),
                  ("CAPTIONER_RUNTIME_DIR", "captioner-runtime-", ".bin"))
MADE_FOLDERS = "CAPTIONER_MADE_FOLDERS"


def _alone(server) -> bool:
    """No other master of this service runs beside this one: none it started with USR2, nor the
    one that started it (while it lives, it is this one's parent)."""
    return server.reexec_pid == 0 and (server.master_pid == 0 or server.master_pid != os.getppid())


def _made_folders() -> list[str]:
    return [folder for folder in os.environ.get(MADE_FOLDERS, "").split(os.pathsep) if folder]


def when_ready(server):
    # Once the sockets are bound (a start that fails, a busy port, makes nothing), before the
    # workers fork and import prometheus_client, which reads its folder at import.
    given = {os.environ.get(variable) for variable, _, _ in SHARED_FOLDERS}
    # Only a USR2 upgrade's master, started by the one that made them, inherits folders to remove
    # (an environment copied from a running server lists that server's).
    made = [folder for folder in _made_folders() if folder in given] if server.master_pid else []
    for variable, prefix, suffix in SHARED_FOLDERS:
        folder = os.environ.get(variable)
        if not folder:
            import tempfile

            os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
            made.append(os.environ[variable])
            continue
        os.makedirs(folder, exist_ok=True)
        if _alone(server):  # after USR2 the old master's workers still write theirs
            for name in os.listdir(folder):  # values of an earlier run
                if name.endswith(suffix):
                    os.remove(os.path.join(folder, name))
    os.environ[MADE_FOLDERS] = os.pathsep.join(made)


def pre_exec(server):
    # A USR2 upgrade starts the new master with gunicorn's start environment, which lacks the
    # folders made above (until a SIGHUP re-reads this file): hand it the same ones.
    for variable in (*(variable for variable, _, _ in SHARED_FOLDERS), MADE_FOLDERS):
        server.cfg.env_orig[variable] = os.environ[variable]


def on_exit(server):
    if _alone(server):
        import shutil

        for folder in _made_folders():
            shutil.rmtree(folder, ignore_errors=True)


def post_worker_init(worker):
    worker.log.info("worker %s ready", worker.pid)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("captioner") if app is not None else None
    if state is not None:
        state.close()

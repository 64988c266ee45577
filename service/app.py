"""The Flask application factory and HTTP API.

    create_app(config=None)   defaults, then CAPTIONER_* environment, then `config` (tests)

The models are loaded and warmed up here, never at import: gunicorn runs `service:create_app()`
in each worker after the fork (no --preload; the master imports only the libraries). HTTP parsing, authentication, rate limits and the
access log live here; the served models and their reload in `models.ModelRegistry`; inference in
`handler.CaptionHandler`; batching in `batcher.MicroBatcher` (one per model); the SIGTERM drain in
`worker.DrainingWorker`.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import math
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Mapping

import torch
from flask import Flask, Response, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

import captioner
from captioner.api import Captioner
from captioner.decode_config import option_kind
from captioner.decoding import DecodeConfig
from captioner.images import ImageError
from captioner.runtime.cpu import keep_freed_memory

from . import access
from .batcher import BatcherClosed, DeadlineExceeded, MicroBatcher, QueueFull
from .config import ServiceConfig
from .handler import CaptionHandler, attention_png
from .cells import model_units
from .metrics import Metrics
from .models import ModelRegistry, ModelSlot, ReloadFailed, UnknownModel
from .openapi import build_openapi
from .problems import Problem
from .ratelimit import TokenBuckets, parse_rate_limit

log = logging.getLogger("captioner.service")

STATIC = os.path.join(os.path.dirname(__file__), "static")
# The batching thread's beam search is Python between short tensor operations, each of which lets
# go of the GIL; a request thread that takes it meanwhile keeps it until Python asks for it back
# after the switch interval, 5 ms by default, so a batch's word steps queued behind the request
# threads' Python. At 0.2 ms: 16 clients 1.26x the requests/s (docs/benchmarks.md, HTTP service).
# A drain puts Python's back: its last accept and the socket's close run in the worker's main
# thread, and request threads taking the GIL between them widen the moment in which a new
# connection would be queued and then reset (seen in 2 of 13 loaded drains at 0.2 ms). Where the
# worker can filter its socket first (service/worker.py) none can queue; where it cannot (sockets
# it was handed, a master it cannot read) this keeps the moment short.
GIL_SWITCH_INTERVAL_S = 0.0002
PYTHON_SWITCH_INTERVAL_S = sys.getswitchinterval()
_OPTION_FIELDS = {f.name: f for f in dataclasses.fields(DecodeConfig)}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclasses.dataclass
class ServiceState:
    config: ServiceConfig
    models: ModelRegistry
    metrics: Metrics
    rate_limits: TokenBuckets | None = None
    ready: bool = False
    draining: bool = False  # SIGTERM came: /readyz says 503 (worker.DrainingWorker)
    reload_siblings: Callable[[], None] | None = None  # under gunicorn: tell the other workers

    def begin_drain(self) -> None:
        sys.setswitchinterval(PYTHON_SWITCH_INTERVAL_S)  # see GIL_SWITCH_INTERVAL_S
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self.models.close()
        if self.rate_limits is not None:
            self.rate_limits.close()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    settings = ServiceConfig.resolve(config)
    workers = int(os.environ.get("CAPTIONER_WORKERS") or 1)  # gunicorn.conf.py sets it for its workers
    threads = settings.torch_threads or max(1, len(os.sched_getaffinity(0)) // workers)
    # Only the batching threads compute in parallel (see batcher.py): loading the models and the
    # request threads' preprocessing run on one thread each.
    torch.set_num_threads(1)
    keep_freed_memory()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    metrics = Metrics()
    if settings.access_log:
        access.configure()

    def load_slot(name: str, path: str | None) -> ModelSlot:
        started = time.monotonic()
        if path:
            model = Captioner.from_checkpoint(path, device=settings.device, precision=settings.precision)
        else:
            model = Captioner.default(device=settings.device, precision=settings.precision)
        handler = CaptionHandler(model, max_pixels=settings.max_pixels)
        if model.inference.runtime == "pytorch":
            # The batching thread's large encoder tensors then reuse the main arena's freed pages
            # (fp32: 11-25% more requests/s one photo at a time); ONNX Runtime allocates its own,
            # and the OpenMP workers of small int8 products are faster with arenas of their own.
            keep_freed_memory(one_arena=True)
        warm = threading.Event()

        def observe_traffic(metric: str, value: float) -> None:  # the warm-up batch is not counted
            if warm.is_set():
                metrics.observe(metric, value)

        batcher = MicroBatcher(handler.infer, max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                               observe=observe_traffic, torch_threads=threads)
        if settings.warmup:  # in the batching thread, which runs every batch
            try:
                handler.warmup(batcher)
            except BaseException:
                batcher.close()
                raise
        warm.set()
        log.info("model %s loaded: %s in %.1f s, %s inference (%s)", name, handler.model_id,
                 time.monotonic() - started, model.inference.precision, model.inference.reason)
        # The ranked units are read with the model, so a reload picks up a new units file too.
        configured = settings.cells if name == default_name else None
        units, missing = model_units(path, configured, hidden_dim=model.decoder.config.hidden_dim)
        if configured and units is None:
            log.warning("model %s: no ranked units for the web page: %s", name, missing)
        return ModelSlot(name, path, model, handler, batcher, units=units, units_missing=missing)

    default_name = settings.model_specs()[0][0]
    limit = parse_rate_limit(settings.rate_limit)
    buckets = None
    if limit is not None:
        shared = os.path.join(settings.runtime_dir, "rate-limits.bin") if settings.runtime_dir else None
        buckets = TokenBuckets(*limit, path=shared)
    state = ServiceState(settings, ModelRegistry(settings.model_specs(), load=load_slot), metrics, buckets)
    state.ready = True
    metrics.ready.set(1)

    app = Flask(__name__, static_folder=STATIC, static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_PARTS"] = settings.max_images_per_request + len(_OPTION_FIELDS) + 5
    app.extensions["captioner"] = state
    _register_docs(app)
    _register_hooks(app, state)
    _register_routes(app, state)
    log.info("captioner service ready: models %s, %d torch threads, batches of up to %d",
             ", ".join(state.models.names), threads, settings.max_batch_size)
    return app


# -- request parsing ------------------------------------------------------------------------------

def parse_options(pairs: list[tuple[str, str]], model: Captioner | None = None) -> DecodeConfig:
    """Query/form fields -> `DecodeConfig`; anything wrong is a 422 with the reason (with `model`,
    also a required word it does not know)."""
    options: dict[str, Any] = {}
    for name, raw in pairs:
        if name not in _OPTION_FIELDS:
            raise Problem(422, f"unknown option {name!r}; options are: {', '.join(_OPTION_FIELDS)}")
        if name in options:
            raise Problem(422, f"option {name!r} given more than once")
        options[name] = _convert(name, raw)
    try:
        decode = DecodeConfig.from_kwargs(**options)
        if model is not None:
            model.requested_words(decode)
        return decode
    except (ValueError, TypeError) as error:
        raise Problem(422, str(error)) from None


def _convert(name: str, raw: str) -> Any:
    """A field's text as the option's kind (`DecodeConfig` then checks its bounds)."""
    kind = option_kind(_OPTION_FIELDS[name])
    text = raw.strip().lower()
    if kind is tuple:  # force_words: comma-separated words
        return text
    if kind is bool:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise Problem(422, f"{name} must be true or false, got {raw!r}")
    if kind is int:
        try:
            return int(text, 10)
        except ValueError:
            raise Problem(422, f"{name} must be an integer, got {raw!r}") from None
    try:
        value = float(text)
    except ValueError:
        raise Problem(422, f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Problem(422, f"{name} must be a finite number, got {raw!r}")
    return value


def read_images(config: ServiceConfig) -> tuple[list[bytes], list[str | None], list[tuple[str, str]]]:
    """The request's images, their filenames, and its option fields (query, then form)."""
    options = list(request.args.items(multi=True))
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        form = request.form  # parses the body (413 past MAX_CONTENT_LENGTH)
        files = request.files.getlist("image")
        others = [key for key in request.files if key != "image"]
        if others:
            raise Problem(400, f"unexpected file part(s) {', '.join(sorted(set(others)))}: send images as 'image'")
        if "image" in form:
            raise Problem(400, "the 'image' part must be a file (with a filename), not a text field")
        options += list(form.items(multi=True))
        if not files:
            raise Problem(400, "no image: send one or more multipart parts named 'image'")
        if len(files) > config.max_images_per_request:
            raise Problem(413, f"{len(files)} images in one request; the limit is {config.max_images_per_request}")
        images = [f.read() for f in files]
        return images, [f.filename or None for f in files], options
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        return [request.get_data(cache=False)], [None], options
    raise Problem(415, f"unsupported Content-Type {mimetype or '(none)'!r}: send an image/* body "
                       "or multipart/form-data with 'image' parts")


def _preprocess(handler: CaptionHandler, images: list[bytes]) -> list[torch.Tensor]:
    pixels = []
    for index, data in enumerate(images):
        try:
            pixels.append(handler.preprocess_one(data))
        except ImageError as error:
            where = f"image {index}: " if len(images) > 1 else ""
            raise Problem(error.status, where + str(error)) from None
    return pixels


def _model_field(pairs: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split the `model` field (which model answers) from the decoding options."""
    names = [value.strip() for key, value in pairs if key == "model"]
    if len(names) > 1:
        raise Problem(422, "option 'model' given more than once")
    return (names[0] if names else None), [(key, value) for key, value in pairs if key != "model"]


def _slot(state: ServiceState, name: str | None) -> ModelSlot:
    try:
        return state.models.get(name)
    except UnknownModel as error:
        raise Problem(422, str(error)) from None


@dataclasses.dataclass
class Answer:
    slot: ModelSlot
    decode: DecodeConfig
    pixels: list[torch.Tensor]
    results: list
    preprocess_s: float
    queue_s: float
    inference_s: float


def _caption(state: ServiceState, images: list[bytes], pairs: list[tuple[str, str]], *,
             attention: bool = False) -> Answer:
    """Caption `images` with the model the request names. A model reloaded between picking its
    slot and queueing the images (its batcher closed) is retried on the new slot."""
    config = state.config
    started = g.started
    deadline = started + config.request_timeout_s
    retry = {"Retry-After": str(config.retry_after_s)}
    name, pairs = _model_field(pairs)
    for _ in range(3):
        slot = _slot(state, name)
        g.model = slot.name
        decode = parse_options(pairs, slot.model)
        if attention:
            decode = dataclasses.replace(decode, return_attention=True)
        if decode.output_hidden_states:
            words = len(images) * decode.num_return_sequences * (decode.max_new_tokens + 1)
            if words > config.max_hidden_state_words:
                raise Problem(422, f"output_hidden_states returns thousands of numbers per word: at most "
                                   f"{config.max_hidden_state_words} words per request (images x num_return_sequences "
                                   f"x (max_new_tokens + 1)), this asks for {words}")
        try:
            with slot.batcher.incoming():  # a batch forming now may wait for these images
                preprocess_started = time.monotonic()
                pixels = _preprocess(slot.handler, images)
                preprocessed_at = time.monotonic()
                jobs = slot.batcher.submit(pixels, decode, deadline=deadline, request_key=uuid.uuid4().hex)
        except QueueFull as error:
            state.metrics.rejected.labels("queue_full").inc()
            raise Problem(503, f"the service is busy ({error}); retry later", headers=retry) from None
        except BatcherClosed as error:
            if state.models.get(slot.name) is not slot:
                continue  # replaced by a reload: queue on the new version
            raise Problem(503, str(error), headers=retry) from None
        break
    else:
        raise Problem(503, "the model was being replaced; retry", headers=retry)
    try:
        results = [job.wait() for job in jobs]
    except DeadlineExceeded:
        state.metrics.rejected.labels("deadline").inc()
        raise Problem(503, f"not captioned within the request deadline of {config.request_timeout_s:g} s; "
                           "retry later", headers=retry) from None
    except BatcherClosed as error:
        raise Problem(503, str(error), headers=retry) from None
    g.images, g.batch_size = len(jobs), max(job.batch_size for job in jobs)
    queued = max((job.started or deadline) - job.enqueued for job in jobs)
    return Answer(slot, decode, pixels, results, preprocessed_at - preprocess_started, queued,
                  time.monotonic() - preprocessed_at - queued)


def _answered_by(response: Response, slot: ModelSlot) -> Response:
    response.headers["X-Captioner-Model"] = slot.name
    response.headers["X-Captioner-Checkpoint"] = slot.sha256 or "unsaved"
    return response


# -- hooks and routes -----------------------------------------------------------------------------

def _register_hooks(app: Flask, state: ServiceState) -> None:
    config = state.config
    metrics = state.metrics
    keys = [key.encode() for key in config.api_keys]

    @app.before_request
    def _start() -> Response | None:
        g.started = time.monotonic()
        g.request_id = access.request_id(request.headers.get("X-Request-ID"))
        if request.method == "OPTIONS" and config.cors_origins and request.headers.get("Origin"):
            return Response(status=204)  # CORS preflight; headers added below
        if not request.path.startswith("/v1/"):
            return None
        client = f"address:{request.remote_addr}"
        if keys:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            matched = None
            for index, key in enumerate(keys):  # compare with every key, in constant time each
                if hmac.compare_digest(given, key):
                    matched = index
            if matched is None:
                return Problem(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               headers={"WWW-Authenticate": 'Bearer realm="captioner"'}).response(g.request_id)
            client = f"key:{matched}"
        if state.rate_limits is not None:
            allowed, wait_s = state.rate_limits.take(client)
            if not allowed:
                metrics.rejected.labels("rate_limit").inc()
                retry_after = max(1, math.ceil(wait_s))
                return Problem(429, f"rate limit of {config.rate_limit} (requests/second[,burst]) reached; "
                                    f"retry in {retry_after} s",
                               headers={"Retry-After": str(retry_after)}).response(g.request_id)
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        latency = time.monotonic() - g.get("started", time.monotonic())
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(latency)
        origin = request.headers.get("Origin")
        if origin and config.cors_origins and ("*" in config.cors_origins or origin in config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in config.cors_origins else origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-ID"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, X-Captioner-Model, X-Captioner-Checkpoint"
            response.headers["Vary"] = "Origin"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        request_id = g.get("request_id") or access.request_id(None)
        response.headers["X-Request-ID"] = request_id
        if config.access_log:
            access.log.info(access.access_line(
                request_id=request_id, method=request.method, route=route, path=request.path[:200],
                status=response.status_code, latency_ms=round(latency * 1000, 2), client=request.remote_addr,
                model=g.get("model"), images=g.get("images"), batch_size=g.get("batch_size")))
        return response

    @app.errorhandler(Problem)
    def _problem(problem: Problem) -> Response:
        return problem.response(g.get("request_id"))

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        headers = {}
        if error.code == 405 and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        detail = error.description or error.name
        if error.code == 413:
            detail = f"the request body is over the limit of {config.max_body_bytes} bytes"
        return Problem(error.code or 500, detail, headers=headers).response(g.get("request_id"))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s (request %s)", request.method, request.path, g.get("request_id"))
        return Problem(500, "internal error; the service logged the details").response(g.get("request_id"))


def _register_routes(app: Flask, state: ServiceState) -> None:
    config = state.config
    spec = build_openapi(config, captioner.__version__)

    @app.post("/v1/captions")
    def captions() -> Response:
        images, filenames, pairs = read_images(config)
        answer = _caption(state, images, pairs)
        handler = answer.slot.handler
        bodies = handler.postprocess(answer.results, attention=answer.decode.return_attention)
        return _answered_by(jsonify({
            "model": handler.model_id,
            "model_name": answer.slot.name,
            "checkpoint_sha256": answer.slot.sha256,
            "images": [{"index": i, "filename": filenames[i], **body} for i, body in enumerate(bodies)],
            "options": answer.decode.to_dict(),
            "timings_ms": {
                "preprocess": round(answer.preprocess_s * 1000, 2),
                "queue": round(answer.queue_s * 1000, 2),
                "inference": round(answer.inference_s * 1000, 2),
                "total": round((time.monotonic() - g.started) * 1000, 2),
            },
        }), answer.slot)

    @app.post("/v1/captions/attention.png")
    def attention_image() -> Response:
        images, _, pairs = read_images(config)
        if len(images) != 1:
            raise Problem(400, f"send exactly one image for the heat map, not {len(images)}")
        name, _ = _model_field(pairs)
        if not _slot(state, name).model.decoder.config.attention:
            raise Problem(422, "this model was trained without attention: there is no heat map to draw")
        answer = _caption(state, images, pairs, attention=True)
        result = answer.results[0]
        response = Response(attention_png(answer.pixels[0], result), mimetype="image/png")
        response.headers["X-Caption"] = result.text.encode("ascii", "replace").decode()
        return _answered_by(response, answer.slot)

    @app.get("/v1/model")
    def model_info() -> Response:
        name, _ = _model_field(list(request.args.items(multi=True)))
        return jsonify(_slot(state, name).card())

    @app.get("/v1/models")
    def models() -> Response:
        return jsonify({"default": state.models.default,
                        "models": [slot.summary() for slot in state.models.slots()]})

    @app.get("/v1/models/<name>/cells")
    def cells(name: str) -> Response:
        if name not in state.models.names:  # a name, never a path: the file was found at load time
            raise Problem(404, f"unknown model {name!r}; this service has: {', '.join(state.models.names)}")
        slot = state.models.get(name)
        if slot.units is None:
            raise Problem(404, f"model {name!r} has no ranked units: {slot.units_missing}")
        return _answered_by(jsonify({"model_name": slot.name, **slot.units}), slot)

    @app.post("/v1/models/<name>/reload")
    def reload(name: str) -> Response:
        if name not in state.models.names:
            raise Problem(404, f"unknown model {name!r}; this service has: {', '.join(state.models.names)}")
        try:
            report = state.models.reload(name)
        except ReloadFailed as error:
            state.metrics.reloads.labels(name, "failed").inc()
            slot = state.models.get(name)
            raise Problem(422, f"{error}; still serving checkpoint {slot.sha256}") from None
        state.metrics.reloads.labels(name, "changed" if report["changed"] else "unchanged").inc()
        if report["changed"] and state.reload_siblings is not None:
            state.reload_siblings()  # the other workers of this server load it too
        return jsonify(report)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz() -> Response:
        if state.draining:
            raise Problem(503, "the server is shutting down", headers={"Retry-After": str(config.retry_after_s)})
        if not state.ready:
            raise Problem(503, "the model is not loaded and warm yet", headers={"Retry-After": "1"})
        slots = state.models.slots()
        return jsonify({"status": "ready", "model": slots[0].handler.model_id,
                        "models": {slot.name: slot.sha256 for slot in slots},
                        "queue_depth": sum(slot.batcher.depth for slot in slots)})

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html")


def _register_docs(app: Flask) -> None:
    """Interactive docs (Swagger UI, its files shipped in the flask-swagger-ui wheel) at /docs/."""
    from flask_swagger_ui import get_swaggerui_blueprint

    app.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json",
                                                   config={"app_name": "captioner API"}))

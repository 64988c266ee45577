"""The Flask application factory and HTTP API.

    create_app(config=None)   defaults, then CAPTIONER_* environment, then `config` (tests)

The model is loaded and warmed up here, never at import: gunicorn runs `service:create_app()` in
each worker after the fork (no --preload). HTTP parsing lives here; inference lives in
`handler.CaptionHandler`; batching in `batcher.MicroBatcher`.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import time
import uuid
from typing import Any, Mapping

import torch
from flask import Flask, Response, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

import captioner
from captioner.api import Captioner
from captioner.decoding import DecodeConfig
from captioner.images import ImageError

from .batcher import BatcherClosed, DeadlineExceeded, MicroBatcher, QueueFull
from .config import ServiceConfig
from .handler import CaptionHandler, attention_png
from .metrics import Metrics
from .openapi import build_openapi
from .problems import Problem

log = logging.getLogger("captioner.service")

STATIC = os.path.join(os.path.dirname(__file__), "static")
_OPTION_FIELDS = {f.name: f for f in dataclasses.fields(DecodeConfig)}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclasses.dataclass
class ServiceState:
    config: ServiceConfig
    model: Captioner
    handler: CaptionHandler
    batcher: MicroBatcher
    metrics: Metrics
    ready: bool = False

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self.batcher.close()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    settings = ServiceConfig.resolve(config)
    workers = int(os.environ.get("CAPTIONER_WORKERS") or 1)  # gunicorn.conf.py sets it for its workers
    threads = settings.torch_threads or max(1, len(os.sched_getaffinity(0)) // workers)
    # Only the batching thread computes in parallel (see batcher.py): loading the model and the
    # request threads' preprocessing run on one thread each.
    torch.set_num_threads(1)

    if settings.checkpoint:
        model = Captioner.from_checkpoint(settings.checkpoint, device=settings.device)
    else:
        model = Captioner.default(device=settings.device)
    handler = CaptionHandler(model, max_pixels=settings.max_pixels)
    metrics = Metrics()

    def observe_traffic(name: str, value: float) -> None:  # the warm-up batch is not counted
        if state.ready:
            metrics.observe(name, value)

    batcher = MicroBatcher(handler.infer, max_batch_size=settings.max_batch_size,
                           max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                           observe=observe_traffic, torch_threads=threads)
    state = ServiceState(settings, model, handler, batcher, metrics)
    if settings.warmup:  # in the batching thread, which runs every batch
        handler.warmup(batcher)
    state.ready = True
    metrics.ready.set(1)

    app = Flask(__name__, static_folder=STATIC, static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_PARTS"] = settings.max_images_per_request + len(_OPTION_FIELDS) + 4
    app.extensions["captioner"] = state
    _register_docs(app)
    _register_hooks(app, state)
    _register_routes(app, state)
    log.info("captioner service ready: %s, %d torch threads, batches of up to %d",
             handler.model_id, threads, settings.max_batch_size)
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
    default = _OPTION_FIELDS[name].default
    text = raw.strip().lower()
    if isinstance(default, tuple):  # force_words: comma-separated words
        return text
    if isinstance(default, bool):
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise Problem(422, f"{name} must be true or false, got {raw!r}")
    if isinstance(default, int) or name == "seed":
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


def _caption(state: ServiceState, pixels: list[torch.Tensor], decode: DecodeConfig, started: float):
    config = state.config
    deadline = started + config.request_timeout_s
    retry = {"Retry-After": str(config.retry_after_s)}
    try:
        jobs = state.batcher.submit(pixels, decode, deadline=deadline, request_key=uuid.uuid4().hex)
    except QueueFull as error:
        state.metrics.rejected.labels("queue_full").inc()
        raise Problem(503, f"the service is busy ({error}); retry later", headers=retry) from None
    except BatcherClosed as error:
        raise Problem(503, str(error), headers=retry) from None
    try:
        results = [job.wait() for job in jobs]
    except DeadlineExceeded:
        state.metrics.rejected.labels("deadline").inc()
        raise Problem(503, f"not captioned within the request deadline of {config.request_timeout_s:g} s; "
                           "retry later", headers=retry) from None
    except BatcherClosed as error:
        raise Problem(503, str(error), headers=retry) from None
    queued = max((job.started or deadline) - job.enqueued for job in jobs)
    return results, queued


# -- hooks and routes -----------------------------------------------------------------------------

def _register_hooks(app: Flask, state: ServiceState) -> None:
    config = state.config
    metrics = state.metrics
    keys = [key.encode() for key in config.api_keys]

    @app.before_request
    def _start() -> Response | None:
        g.started = time.monotonic()
        if request.method == "OPTIONS" and config.cors_origins and request.headers.get("Origin"):
            return Response(status=204)  # CORS preflight; headers added below
        if keys and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            matched = False
            for key in keys:  # compare with every key, in constant time each
                matched |= hmac.compare_digest(given, key)
            if not matched:
                problem = Problem(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  headers={"WWW-Authenticate": 'Bearer realm="captioner"'})
                return problem.response()
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.monotonic() - g.get("started", time.monotonic()))
        origin = request.headers.get("Origin")
        if origin and config.cors_origins and ("*" in config.cors_origins or origin in config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in config.cors_origins else origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Vary"] = "Origin"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.errorhandler(Problem)
    def _problem(problem: Problem) -> Response:
        return problem.response()

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        headers = {}
        if error.code == 405 and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        detail = error.description or error.name
        if error.code == 413:
            detail = f"the request body is over the limit of {config.max_body_bytes} bytes"
        return Problem(error.code or 500, detail, headers=headers).response()

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return Problem(500, "internal error; the service logged the details").response()


def _register_routes(app: Flask, state: ServiceState) -> None:
    handler, config = state.handler, state.config
    description = state.model.describe()
    provenance = description.get("provenance") or {}
    train_cfg = (provenance.get("config") or {}).get("data") if isinstance(provenance.get("config"), dict) else None
    model_card = {
        "id": handler.model_id,
        **{k: v for k, v in description.items() if k != "provenance"},
        "training_data": {"data": train_cfg, "train_images": provenance.get("train_images")}
        if train_cfg or provenance.get("train_images") else None,
        "metrics": provenance.get("metrics") or {},
        "provenance": provenance,
    }
    spec = build_openapi(config, captioner.__version__)

    @app.post("/v1/captions")
    def captions() -> Response:
        started = g.started
        images, filenames, pairs = read_images(config)
        decode = parse_options(pairs, state.model)
        decoded_at = time.monotonic()
        pixels = _preprocess(handler, images)
        preprocessed_at = time.monotonic()
        results, queued = _caption(state, pixels, decode, started)
        done_at = time.monotonic()
        bodies = handler.postprocess(results, attention=decode.return_attention)
        return jsonify({
            "model": handler.model_id,
            "images": [{"index": i, "filename": filenames[i], **body} for i, body in enumerate(bodies)],
            "options": decode.to_dict(),
            "timings_ms": {
                "preprocess": round((preprocessed_at - decoded_at) * 1000, 2),
                "queue": round(queued * 1000, 2),
                "inference": round((done_at - preprocessed_at - queued) * 1000, 2),
                "total": round((time.monotonic() - started) * 1000, 2),
            },
        })

    @app.post("/v1/captions/attention.png")
    def attention_image() -> Response:
        if not state.model.decoder.config.attention:
            raise Problem(422, "this model was trained without attention: there is no heat map to draw")
        images, _, pairs = read_images(config)
        if len(images) != 1:
            raise Problem(400, f"send exactly one image for the heat map, not {len(images)}")
        decode = dataclasses.replace(parse_options(pairs, state.model), return_attention=True)
        pixels = _preprocess(handler, images)
        results, _ = _caption(state, pixels, decode, g.started)
        png = attention_png(pixels[0], results[0])
        response = Response(png, mimetype="image/png")
        response.headers["X-Caption"] = results[0].text.encode("ascii", "replace").decode()
        return response

    @app.get("/v1/model")
    def model_info() -> Response:
        return jsonify(model_card)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz() -> Response:
        if not state.ready:
            raise Problem(503, "the model is not loaded and warm yet", headers={"Retry-After": "1"})
        return jsonify({"status": "ready", "model": handler.model_id, "queue_depth": state.batcher.depth})

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

"""`ServiceConfig`: every setting of the HTTP service, with its `CAPTIONER_*` environment name.

Precedence (lowest first): the dataclass defaults, then the environment, then the mapping passed
to `create_app(config)` (tests). Environment values are parsed with the field's type, so
`CAPTIONER_MAX_BATCH_SIZE=8` or `CAPTIONER_DEV=true` work as expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from captioner.images import DEFAULT_MAX_PIXELS

from .models import DEFAULT_NAME, parse_model_specs
from .ratelimit import parse_rate_limit

ENV_PREFIX = "CAPTIONER_"


@dataclass
class ServiceConfig:
    checkpoint: str | None = None  # None: the model bundled with the package
    models: list[str] = field(default_factory=list)  # "name=path" items; the first is the default
    device: str = "cpu"
    precision: str = "auto"  # auto, fp32, bf16 or int8: the encoder's path (captioner/runtime/precision.py)
    torch_threads: int = 0  # 0: cores / gunicorn workers
    warmup: bool = True  # caption one image before /readyz says ready
    cells: str | None = None  # the default model's ranked units (captioner cells --units-file); None: beside its checkpoint

    # micro-batching
    max_batch_size: int = 16  # images per encoder+decoder batch; 1 turns batching off
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for requests being decoded
    max_queue: int = 64  # images waiting; beyond it new requests get 503 at once
    request_timeout_s: float = 30.0  # per-request deadline (queueing and inference)
    retry_after_s: int = 1

    # limits
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = 16
    max_hidden_state_words: int = 256  # output_hidden_states: images x sequences x (max_new_tokens + 1)

    # security
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off; "*" allows any
    rate_limit: str = ""  # "requests/second[,burst]" per API key (or client address); empty: none

    # operations
    drain_s: float = 5.0  # after SIGTERM: /readyz 503, keep answering this long, then close the socket
    access_log: bool = True  # one JSON line per request on stderr
    runtime_dir: str | None = None  # shared by a server's workers (gunicorn.conf.py makes one)

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for name, spec in known.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _parse(name, raw, spec.type)
        for name, value in (overrides or {}).items():
            if name not in known:
                raise ValueError(f"unknown service setting {name!r}; known: {', '.join(known)}")
            values[name] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_body_bytes", "max_pixels", "max_images_per_request",
                    "max_hidden_state_words")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_queue < self.max_images_per_request:
            raise ValueError("max_queue must hold at least one full request (max_images_per_request)")
        if self.drain_s < 0:
            raise ValueError("drain_s must be >= 0")
        if self.models and self.checkpoint:
            raise ValueError("give either checkpoint (one model) or models (name=path,...), not both")
        self.model_specs()
        parse_rate_limit(self.rate_limit)

    def model_specs(self) -> list[tuple[str, str | None]]:
        """[(name, checkpoint path or None for the bundled model)], the default first."""
        if self.models:
            return list(parse_model_specs(self.models))
        return [(DEFAULT_NAME, self.checkpoint)]


def _parse(name: str, raw: str, kind: str) -> Any:
    try:
        if kind.startswith("list"):
            return [item.strip() for item in raw.split(",") if item.strip()]
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None

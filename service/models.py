"""The models one worker serves, each with its own micro-batcher, and their hot reload.

    registry = ModelRegistry(specs, load=load_slot)   # specs: [(name, checkpoint path or None)]
    slot = registry.get("default")                     # the first model when name is None
    registry.reload("default")                         # the file's new version, or the old one kept

A `ModelSlot` is everything one checkpoint needs to answer requests: the `Captioner`, its
handler, its batcher and its model card. A reload loads and warms a whole new slot beside the old
one, then swaps it in with one assignment: requests already queued in the old batcher are still
computed there (it drains, then its thread ends), and a request that picked the old slot just
before the swap finds its batcher closed and retries on the new one (see app.py). A checkpoint
that does not load leaves the old slot serving and says why.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from captioner.api import Captioner
from captioner.checkpoint import file_sha256

from .batcher import MicroBatcher
from .handler import CaptionHandler

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_NAME = "default"


class UnknownModel(LookupError):
    pass


class ReloadFailed(Exception):
    """The new checkpoint did not load; the previous version keeps serving."""


@dataclass(eq=False)
class ModelSlot:
    name: str
    path: str | None  # None: the model bundled with the package
    model: Captioner
    handler: CaptionHandler
    batcher: MicroBatcher
    loaded_at: float = field(default_factory=time.time)  # Unix time
    reloads: int = 0
    last_reload_error: str | None = None
    units: dict[str, Any] | None = None  # the ranked units of GET /v1/models/NAME/cells (service/cells.py)
    units_missing: str = ""  # why there are none

    @property
    def sha256(self) -> str | None:
        return self.model.checkpoint_sha256

    @functools.cached_property
    def _described(self) -> dict[str, Any]:
        """What does not change while the slot serves (computed on the first /v1/model)."""
        description = self.model.describe()
        provenance = description.pop("provenance", None) or {}
        config = provenance.get("config")
        data = config.get("data") if isinstance(config, dict) else None
        return {
            "name": self.name,
            "id": self.handler.model_id,
            **description,
            "checkpoint": self.path or "(bundled)",
            "training_data": {"data": data, "train_images": provenance.get("train_images")}
            if data or provenance.get("train_images") else None,
            "metrics": provenance.get("metrics") or {},
            "loaded_at": round(self.loaded_at, 3),
            "provenance": provenance,
        }

    def card(self) -> dict[str, Any]:
        """GET /v1/model: what the model is, how it was trained and measured, how it was reloaded."""
        return {**self._described, "reloads": self.reloads, "last_reload_error": self.last_reload_error,
                "cells": self.units is not None}

    def summary(self) -> dict[str, Any]:
        """One entry of GET /v1/models."""
        card = self.card()
        return {key: card[key] for key in ("name", "id", "checkpoint", "checkpoint_sha256", "backbone",
                                           "vocabulary_size", "metrics", "loaded_at", "reloads",
                                           "last_reload_error", "cells")}


Loader = Callable[[str, "str | None"], ModelSlot]


class ModelRegistry:
    def __init__(self, specs: list[tuple[str, str | None]], *, load: Loader):
        if not specs:
            raise ValueError("no model to serve")
        self._load = load
        self._slots: dict[str, ModelSlot] = {}
        for name, path in specs:
            if name in self._slots:
                raise ValueError(f"model name {name!r} is given twice")
            self._slots[name] = load(name, path)
        self.default = specs[0][0]
        self._reloading = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    def get(self, name: str | None = None) -> ModelSlot:
        try:
            return self._slots[name or self.default]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; this service has: {', '.join(self._slots)}") from None

    def reload(self, name: str) -> dict[str, Any]:
        """Load `name`'s checkpoint file again if it changed; -> what happened. Raises
        `ReloadFailed` (the old version still serving) when the new file does not load."""
        with self._reloading:  # one reload at a time: two would load the same file twice
            old = self.get(name)
            started = time.monotonic()
            try:
                sha = file_sha256(old.path) if old.path else old.sha256
            except OSError as error:
                old.last_reload_error = f"cannot read {old.path}: {error.strerror or error}"
                raise ReloadFailed(old.last_reload_error) from None
            if sha == old.sha256:
                return {"name": name, "changed": False, "checkpoint_sha256": sha, "reload_s": 0.0}
            try:
                new = self._load(name, old.path)
            except Exception as error:  # whatever a bad file raises, the old model keeps serving
                old.last_reload_error = f"{old.path} did not load ({type(error).__name__}: {error})"
                raise ReloadFailed(old.last_reload_error) from None
            new.reloads = old.reloads + 1
            self._slots[name] = new  # the swap: requests from now on use the new slot
            old.batcher.close(drain=True)  # queued images are still computed by the old model
            return {"name": name, "changed": True, "checkpoint_sha256": new.sha256,
                    "previous_sha256": old.sha256, "reload_s": round(time.monotonic() - started, 3)}

    def reload_all(self) -> list[dict[str, Any]]:
        """Every model whose file changed (SIGHUP of a worker); failures are reported, not raised."""
        reports = []
        for name in self.names:
            try:
                reports.append(self.reload(name))
            except ReloadFailed as error:
                reports.append({"name": name, "changed": False, "error": str(error)})
        return reports

    def close(self) -> None:
        for slot in self.slots():
            slot.batcher.close()


def parse_model_specs(items: list[str]) -> list[tuple[str, str]]:
    """['name=path', ...] -> [(name, path), ...], names checked."""
    specs = []
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise ValueError(f"model {item!r}: expected NAME=CHECKPOINT_PATH")
        if not NAME.match(name):
            raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        specs.append((name, path))
    return specs


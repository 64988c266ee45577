"""The OpenAPI 3.1 document of the service. The decoding options' types, bounds and descriptions
come from `DecodeConfig`'s fields, as validation reads them, so the document never drifts."""

from __future__ import annotations

import dataclasses
from typing import Any

from captioner.decode_config import option_kind
from captioner.decoding import DecodeConfig

from .config import ServiceConfig


def option_schema(field: dataclasses.Field) -> dict[str, Any]:
    kind, default, meta = option_kind(field), field.default, field.metadata
    if kind is bool:
        schema: dict[str, Any] = {"type": "boolean"}
    elif kind is tuple:  # force_words travels as one comma-separated field
        schema = {"type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9', ]*$"}
        default = ",".join(default)
    else:
        low = "exclusiveMinimum" if meta["exclusive_minimum"] else "minimum"
        schema = {"type": "integer" if kind is int else "number", low: meta["minimum"], "maximum": meta["maximum"]}
    if default is not None:
        schema["default"] = default
    return schema


MODEL_PARAMETER = {"name": "model", "in": "query", "required": False,
                   "schema": {"type": "string", "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
                   "description": "which served model answers (GET /v1/models lists them); default: the first"}
REQUEST_ID = {"name": "X-Request-ID", "in": "header", "required": False,
              "schema": {"type": "string", "maxLength": 512},
              "description": "an id to find this request in the logs (kept when made of letters, digits and "
                             "-_.:/+=@, cut to 128); echoed in the response, made when absent"}


def _option_parameters() -> list[dict[str, Any]]:
    return [{"name": f.name, "in": "query", "required": False, "schema": option_schema(f),
             "description": f.metadata["help"]} for f in dataclasses.fields(DecodeConfig)] \
        + [MODEL_PARAMETER, REQUEST_ID]


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def build_openapi(config: ServiceConfig, version: str) -> dict[str, Any]:
    errors = {
        "400": _problem("truncated or corrupt image, or a malformed request"),
        "401": _problem("missing or wrong API key (when keys are configured)"),
        "413": _problem(f"body over {config.max_body_bytes} bytes, image over {config.max_pixels} pixels, "
                        f"or more than {config.max_images_per_request} images"),
        "415": _problem("not an image, an unsupported image format, or an unsupported Content-Type"),
        "422": _problem("a decoding option out of range, of the wrong type, or unknown, or an unknown model"),
        "429": {**_problem("the client's rate limit is reached; retry after Retry-After seconds"),
                "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
        "503": {**_problem("the batch queue is full, the request's deadline passed or the server is shutting "
                           "down; retry later"),
                "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    }
    answered_by = {"X-Captioner-Model": {"schema": {"type": "string"}, "description": "the model that answered"},
                   "X-Captioner-Checkpoint": {"schema": {"type": "string"},
                                              "description": "its checkpoint's SHA-256"},
                   "X-Request-ID": {"schema": {"type": "string"}}}
    multipart = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary", "contentMediaType": "image/*"},
                      "minItems": 1, "maxItems": config.max_images_per_request,
                      "description": "one part per image"},
            **{f.name: option_schema(f) for f in dataclasses.fields(DecodeConfig)},
            "model": MODEL_PARAMETER["schema"],
        },
    }
    image_body = {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "contentMediaType": "image/*"}},
            "multipart/form-data": {"schema": multipart, "encoding": {"image": {"contentType": "image/*"}}},
        },
    }
    security = [{"bearer": []}] if config.api_keys else []
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "captioner",
            "version": version,
            "description": "Image captioning: a pretrained CNN encoder and an LSTM decoder with soft attention. "
                           "Images are never fetched from URLs or paths: send their bytes.",
        },
        "paths": {
            "/v1/captions": {"post": {
                "operationId": "caption",
                "summary": "Caption one or more images",
                "description": "One image as the raw body (Content-Type image/*) or images as multipart parts "
                               "named `image`. Options as query or form fields.",
                "parameters": _option_parameters(),
                "requestBody": image_body,
                "security": security,
                "responses": {"200": {"description": "captions, best first", "headers": answered_by,
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/CaptionResponse"}}}},
                              **errors},
            }},
            "/v1/captions/attention.png": {"post": {
                "operationId": "attentionPng",
                "summary": "The image with one attention heat-map panel per generated word",
                "parameters": _option_parameters(),
                "requestBody": image_body,
                "security": security,
                "responses": {"200": {"description": "PNG contact sheet", "headers": answered_by,
                                      "content": {"image/png": {"schema": {"type": "string",
                                                                           "contentMediaType": "image/png"}}}},
                              **errors},
            }},
            "/v1/model": {"get": {
                "operationId": "model",
                "summary": "The model card of one served model (the default one unless `model` names another)",
                "parameters": [MODEL_PARAMETER, REQUEST_ID],
                "security": security,
                "responses": {"200": {"description": "model card",
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Model"}}}},
                              "401": errors["401"], "422": errors["422"], "429": errors["429"]},
            }},
            "/v1/models": {"get": {
                "operationId": "models",
                "summary": "Every served model: name, checkpoint SHA-256, backbone, metrics, reloads",
                "parameters": [REQUEST_ID],
                "security": security,
                "responses": {"200": {"description": "the models, the default first",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "required": ["default", "models"],
                                          "properties": {"default": {"type": "string"},
                                                         "models": {"type": "array", "items": {"type": "object"}}}}}}},
                              "401": errors["401"], "429": errors["429"]},
            }},
            "/v1/models/{name}/cells": {"get": {
                "operationId": "modelCells",
                "summary": "The model's ranked LSTM units (captioner cells), for colouring a caption by one",
                "description": "What `captioner cells` found each unit tracks, best first. A unit's value at "
                               "word t is the state after reading word t: entry t + 1 of a caption's "
                               "`hidden_states` (output_hidden_states=true). The bundled model ships its "
                               "units; another checkpoint has them in `<stem>.cells.json` or `cells.json` beside "
                               "it, or in CAPTIONER_CELLS. `GET /v1/models` says which models have them (`cells`).",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": 64}}, REQUEST_ID],
                "security": security,
                "responses": {"200": {"description": "the ranked units", "headers": answered_by,
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Units"}}}},
                              "401": errors["401"],
                              "404": _problem("no model of that name, or the model has no ranked units"),
                              "429": errors["429"]},
            }},
            "/v1/models/{name}/reload": {"post": {
                "operationId": "reloadModel",
                "summary": "Load the model's checkpoint file again (after it was replaced)",
                "description": "The new version is loaded and warmed beside the old one, then swapped in: no "
                               "request fails. Under gunicorn the other workers reload on the SIGHUP they are "
                               "sent. A file that does not load leaves the old version serving (422 says why).",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": 64}}, REQUEST_ID],
                "security": security,
                "responses": {"200": {"description": "reloaded, or unchanged (same SHA-256)",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "required": ["name", "changed", "checkpoint_sha256"],
                                          "properties": {"name": {"type": "string"}, "changed": {"type": "boolean"},
                                                         "checkpoint_sha256": {"type": ["string", "null"]},
                                                         "previous_sha256": {"type": ["string", "null"]},
                                                         "reload_s": {"type": "number"}}}}}},
                              "401": errors["401"], "404": _problem("no model of that name"),
                              "422": _problem("the checkpoint did not load; the previous version keeps serving"),
                              "429": errors["429"]},
            }},
            "/healthz": {"get": {"operationId": "healthz", "summary": "The process is alive",
                                 "responses": {"200": {"description": "alive", "content": {
                                     "application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "The model is loaded and warm",
                                "responses": {"200": {"description": "ready", "content": {
                                    "application/json": {"schema": {"type": "object"}}}},
                                    "503": _problem("not loaded yet, or shutting down (SIGTERM)")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                   "status": {"type": "integer"}, "detail": {"type": "string"},
                                   "request_id": {"type": "string"}},
                },
                "Sequence": {
                    "type": "object",
                    "required": ["text", "words", "log_prob", "score", "token_log_probs", "finished"],
                    "properties": {
                        "text": {"type": "string"},
                        "words": {"type": "array", "items": {"type": "string"}},
                        "log_prob": {"type": "number"},
                        "score": {"type": "number"},
                        "token_log_probs": {"type": "array", "items": {"type": "number"}},
                        "finished": {"type": "boolean", "description": "ended with <eos>"},
                        "attention": {"type": "array", "description": "(T, H', W'): one grid per word, then <eos>",
                                      "items": {"type": "array", "items": {"type": "array",
                                                                            "items": {"type": "number"}}}},
                        "attention_shape": {"type": "array", "items": {"type": "integer"}},
                        "hidden_states": {
                            "type": "object",
                            "description": "with output_hidden_states: the LSTM's top-layer state from which each "
                                           "word (then <eos>) was chosen; h and c (T, D), and on PyTorch the gates "
                                           "i, f, g, o, each (T, D)",
                            "properties": {
                                "h": {"$ref": "#/components/schemas/Matrix"},
                                "c": {"$ref": "#/components/schemas/Matrix"},
                                "gates": {"type": "object", "properties": {
                                    g: {"$ref": "#/components/schemas/Matrix"} for g in ("i", "f", "g", "o")}},
                            },
                        },
                    },
                },
                "Units": {
                    "type": "object",
                    "required": ["model_name", "units"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "alignment": {"type": ["string", "null"]},
                        "data": {"type": ["string", "null"], "description": "the caption set they were ranked on"},
                        "split": {"type": ["string", "null"]},
                        "baseline": {"type": ["object", "null"],
                                     "description": "scores of units shuffled across words (shuffled_max, ...)"},
                        "units": {"type": "array", "items": {
                            "type": "object",
                            "required": ["name", "kind", "index"],
                            "properties": {
                                "name": {"type": "string", "examples": ["unit 68 (c): subject already named"]},
                                "kind": {"enum": ["h", "c"], "description": "hidden state or memory cell"},
                                "index": {"type": "integer", "minimum": 0},
                                "property": {"type": "string"}, "label": {"type": "string"},
                                "group": {"type": "string"}, "direction": {"type": "string"},
                                "score": {"type": "number", "description": "|Spearman rho| or |2 AUC - 1|"},
                                "over_shuffled_max": {"type": "number"},
                            }}},
                    },
                },
                "Matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "ImageResult": {
                    "type": "object",
                    "required": ["index", "caption", "score", "sequences"],
                    "properties": {
                        "index": {"type": "integer"},
                        "filename": {"type": ["string", "null"]},
                        "caption": {"type": "string"},
                        "score": {"type": "number"},
                        "sequences": {"type": "array", "items": {"$ref": "#/components/schemas/Sequence"}},
                    },
                },
                "CaptionResponse": {
                    "type": "object",
                    "required": ["model", "model_name", "checkpoint_sha256", "images", "options", "timings_ms"],
                    "properties": {
                        "model": {"type": "string", "description": "id: backbone and checkpoint SHA-256 prefix"},
                        "model_name": {"type": "string", "description": "the served name (`model=`)"},
                        "checkpoint_sha256": {"type": ["string", "null"]},
                        "images": {"type": "array", "items": {"$ref": "#/components/schemas/ImageResult"}},
                        "options": {"type": "object"},
                        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
                    },
                },
                "Model": {
                    "type": "object",
                    "required": ["name", "id", "backbone", "attention", "vocabulary_size", "checkpoint_sha256"],
                    "properties": {
                        "name": {"type": "string"},
                        "id": {"type": "string"},
                        "backbone": {"type": "string"},
                        "attention": {"type": "boolean"},
                        "vocabulary_size": {"type": "integer"},
                        "feature_grid": {"type": "array", "items": {"type": "integer"}},
                        "checkpoint_sha256": {"type": ["string", "null"]},
                        "training_data": {},
                        "metrics": {"type": "object"},
                        "provenance": {"type": "object"},
                    },
                },
            },
        },
    }

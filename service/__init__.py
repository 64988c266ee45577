"""The HTTP captioning service: `gunicorn -c service/gunicorn.conf.py 'service:create_app()'`.

Importing this package is cheap (the `captioner` command imports `service.cli`): Flask, torch and
the model load only when `create_app` is called.
"""

from __future__ import annotations

from typing import Any, Mapping


def create_app(config: Mapping[str, Any] | None = None):
    """Build the Flask app: settings from defaults, then CAPTIONER_* environment, then `config`."""
    from .app import create_app as _create_app

    return _create_app(config)


__all__ = ["create_app"]

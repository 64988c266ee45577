"""RFC 9457 problem details: every error the service answers is `application/problem+json`
with `type`, `title`, `status`, `detail` and the `request_id` (also its X-Request-ID header)."""

from __future__ import annotations

from http import HTTPStatus

from flask import Response, json

PROBLEM_TYPE = "about:blank"  # the status code's title says it all (RFC 9457 section 4.2.1)


class Problem(Exception):
    """Raise anywhere in a request to answer with this problem."""

    def __init__(self, status: int, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}

    def response(self, request_id: str | None = None) -> Response:
        body = {"type": PROBLEM_TYPE, "title": self.title, "status": self.status, "detail": self.detail}
        if request_id:
            body["request_id"] = request_id  # an extension member (RFC 9457 section 3.2)
        response = Response(json.dumps(body), status=self.status, mimetype="application/problem+json")
        for name, value in self.headers.items():
            response.headers[name] = value
        return response

"""The HTTP guards in front of the prediction service (`emofuse.core.apps.serve`): body size and arrival
time, admission (a bounded number of requests at once), the API key, and strict form parsing (text
fields UTF-8 and bounded, one clip per form, 415 for a body that is not a form).

Plain ASGI middleware, so each refusal is made before the body is read where it can be, and answers with
the same one-line JSON ``detail`` as every other refusal of the service.
"""
from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

#: The header that carries the API key, when the service has one.
API_KEY_HEADER = "X-API-Key"


def json_refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimits:
    """Refuses a request body over `max_bytes` (by its Content-Length before reading it, else as it streams
    in) and one that does not arrive within `timeout_s` (408, and the connection is closed): a client that
    sends headers and then trickles, or stops, holds nothing for long.

    FastAPI's own route limit answers plain text; this answers with the same JSON ``detail`` line as
    every other refusal, naming the limit.
    """

    def __init__(self, app: Any, max_bytes: int, detail: str, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await json_refusal(413, self.detail, {"Connection": "close"})(scope, receive, send)
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def guarded() -> dict:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.detail, headers={"Connection": "close"})
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)


class Admission:
    """At most `limit` prediction requests in the service at once; more are answered 503 at once, before
    their body is read, with a Retry-After from how long recent requests took."""

    def __init__(self, app: Any, limit: int, path: str, method: str = "POST"):
        self.app = app
        self.limit = limit
        self.path = path
        self.method = method
        self.in_flight = 0
        self.recent_s = 1.0  # a moving average of request durations

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            wait = max(1, min(60, math.ceil(self.recent_s)))
            return await json_refusal(503, f"the service is at its limit of {self.limit} requests at once: "
                                           f"retry in {wait} s",
                                      {"Retry-After": str(wait), "Connection": "close"})(scope, receive, send)
        self.in_flight += 1
        start = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.recent_s = 0.8 * self.recent_s + 0.2 * (time.monotonic() - start)


class RequireKey:
    """/v1/ requests must carry the service's key in ``X-API-Key`` (compared in constant time); the page,
    the docs and the health checks stay open."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            given = Headers(scope=scope).get(API_KEY_HEADER, "").encode()
            if not hmac.compare_digest(given, self.key):
                return await json_refusal(401, f"this service needs its API key in the {API_KEY_HEADER} header")(
                    scope, receive, send)
        await self.app(scope, receive, send)


class StrictFormParser(MultiPartParser):
    """Starlette's multipart parser with this service's rules for text fields: each must be UTF-8 (or the
    charset the request names), never silently read as Latin-1, and at most `max_chars` characters, refused
    with the same line as a transcript one character too long. Relies on the parser's `_current_part`."""

    max_chars = 2000

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > 4 * self.max_chars:  # 4 bytes per character at most
            raise MultiPartException(f"{part.field_name}: String should have at most {self.max_chars} characters")
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"{part.field_name}: not UTF-8 text (send form fields as UTF-8)") from None
        super().on_part_end()


def strict_form_route(max_chars: int) -> type[APIRoute]:
    """A route class whose requests parse forms with `StrictFormParser` and refuse a body that is not a form."""
    parser = type("ServiceFormParser", (StrictFormParser,), {"max_chars": max_chars})

    class StrictFormRequest(Request):
        async def _get_form(self, **limits: Any):  # type: ignore[override]
            content_type, _ = parse_options_header(self.headers.get("Content-Type"))
            if self._form is None and content_type == b"multipart/form-data":
                try:
                    self._form = await parser(self.headers, self.stream(), max_files=4, max_fields=16).parse()
                except MultiPartException as exc:
                    status = 422 if "should have at most" in exc.message or "UTF-8" in exc.message else 400
                    raise HTTPException(status, exc.message) from None
            return await super()._get_form(**limits)

    class StrictFormRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            takes_form = self.body_field is not None

            async def strict(request: Request) -> Response:
                if takes_form:
                    content_type, _ = parse_options_header(request.headers.get("Content-Type"))
                    if content_type != b"multipart/form-data":
                        return json_refusal(415, f"send the clip as multipart/form-data with a `file` field, not "
                                          f"{content_type.decode('latin-1') or 'a body without a content type'}")
                return await handler(StrictFormRequest(request.scope, request.receive))

            return strict

    return StrictFormRoute


__all__ = ["API_KEY_HEADER", "Admission", "BodyLimits", "RequireKey", "StrictFormParser", "json_refusal",
           "strict_form_route"]

"""What happens to every request around its route: id, API key, upload limit, audit row, metrics, log line.

A pure ASGI middleware (no ``BaseHTTPMiddleware``: it sees the body as it streams, and holds
the response start until the audit row is committed). For each HTTP request, in order:

1. a request id (``X-Request-ID`` on every response) and, under ``/v1/``, an audit record;
2. under ``/v1/`` with API keys configured, ``Authorization: Bearer <key>`` or 401;
3. a ``Content-Length`` over the limit is refused with 413 before any body is read, and a
   body that streams past it (chunked, or a lying length) is cut off with 413;
4. the route runs; an unhandled exception becomes a 500 in the error shape;
5. at the response start, the audit row is committed first (a failed commit turns the
   answer into a 503: nothing is answered that is not in the log), then the response goes out.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .audit import AuditError, AuditRecord, utc_now
from .errors import AUDIT_RETRY_AFTER_S, FORM_OVERHEAD_BYTES, UploadTooLarge, error_response
from .metrics import method_label, path_label

log = logging.getLogger(__name__)


def is_audited(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def standard_headers(request_id: str, audited: bool) -> dict[str, str]:
    """The headers every response carries; a /v1 answer is about one patient's film, so never cached."""
    headers = {"X-Request-ID": request_id, "X-Content-Type-Options": "nosniff"}
    if audited:
        headers["Cache-Control"] = "no-store"
    return headers


class ServiceMiddleware:
    """See the module docstring; ``service`` is the app's ``Service`` (settings, keys, audit, metrics, model)."""

    def __init__(self, app: ASGIApp, service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.service
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        path = scope["path"]
        audited = is_audited(path)
        record = None
        if audited:
            client = scope.get("client")
            record = AuditRecord(request_id=request_id, time=utc_now(), method=scope["method"], path=path,
                                 client=client[0] if client else None)
            if service.ready:
                record.model_version, record.threshold = service.model_version, service.threshold
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, audit=record)
        started = replaced = False

        async def send_wrapped(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the original answer is dropped: an audit failure replaced it
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                latency = time.perf_counter() - t0
                MutableHeaders(scope=message).update(standard_headers(request_id, audited))
                if record is not None:
                    record.status, record.latency_ms = status, round(latency * 1000.0, 3)
                    try:
                        await self._commit(record)
                    except AuditError as exc:
                        replaced = True
                        status = 503
                        headers = {**standard_headers(request_id, audited), "Retry-After": str(AUDIT_RETRY_AFTER_S)}
                        response = error_response(scope, 503, "AuditError",
                                                  f"{exc}; the request was not processed into the record, "
                                                  "so no answer is given", headers)
                        await response(scope, receive, send)
                        self._observe(scope, status, time.perf_counter() - t0, None)
                        return
                self._observe(scope, status, time.perf_counter() - t0, record)
            await send(message)

        async def refuse(status: int, error_type: str, message: str, headers: dict | None = None) -> None:
            await error_response(scope, status, error_type, message, headers)(scope, receive, send_wrapped)

        if audited and service.keys is not None:
            key_id = service.keys.key_id(Headers(scope=scope).get("authorization"))
            if key_id is None:
                await refuse(401, "Unauthorized", "missing or unknown API key: send the header "
                             "'Authorization: Bearer <key>'", {"WWW-Authenticate": 'Bearer realm="pneumoscan"'})
                return
            record.api_key_id = key_id

        file_limit = service.settings.max_upload_bytes
        limit = file_limit + FORM_OVERHEAD_BYTES  # the body's; the file's own is checked once it is read
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            too_large = UploadTooLarge(file_limit)
            await refuse(too_large.status, too_large.error_type, str(too_large))
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(file_limit)
            return message

        try:
            await self.app(scope, receive_limited, send_wrapped)
        except Exception:
            log.exception("request %s %s %s failed", request_id, scope["method"], path)
            if started:
                raise
            await refuse(500, "InternalError", "internal error; the request id names it in the server log")

    async def _commit(self, record: AuditRecord) -> None:
        t0 = time.perf_counter()
        await asyncio.wrap_future(self.service.audit.submit(record))
        self.service.metrics.audit_seconds.observe(time.perf_counter() - t0)

    def _observe(self, scope: Scope, status: int, seconds: float, record: AuditRecord | None) -> None:
        metrics = self.service.metrics
        label = path_label(scope["path"])
        metrics.requests.labels(method_label(scope["method"]), label, str(status)).inc()
        metrics.latency.labels(label).observe(seconds)
        error_type = scope["state"].get("error_type")
        if error_type is not None and is_audited(scope["path"]):  # /v1 requests only, as the metric says
            metrics.refusals.labels(error_type).inc()
        if record is not None and status == 200 and record.prediction is not None:
            metrics.predictions.labels(record.prediction, record.risk_level or "").inc()
        level = logging.INFO if record is not None or status >= 400 else logging.DEBUG
        outcome = record.prediction if record is not None and record.prediction else error_type or ""
        log.log(level, "%s %s %s %d %.0f ms %s", scope["state"]["request_id"], scope["method"], scope["path"],
                status, seconds * 1000.0, outcome)

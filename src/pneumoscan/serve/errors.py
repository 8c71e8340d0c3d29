"""The service's one error shape, ``{"error", "error_type", "request_id"}``, and the exceptions that produce it."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Scope


class ApiError(Exception):
    """An error answer: raised in a route, turned into the error shape by the app's handler."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = headers


# Room for a multipart form's boundaries and part headers around a file of --max_upload_mb: the body may be this
# much larger, the file itself may not (upload.read_upload checks it), so a file of exactly the limit is accepted.
FORM_OVERHEAD_BYTES = 64 * 1024


class UploadTooLarge(ApiError):
    """The request body passed ``--max_upload_mb`` (raised while it streams in)."""

    def __init__(self, limit_bytes: int) -> None:
        mib = round(limit_bytes / 2**20, 3)  # 0.1, not 0.0999994 (the limit is a whole number of bytes)
        super().__init__(413, "UploadTooLarge", f"upload is larger than the {mib:g} MiB this service "
                                                "accepts (--max_upload_mb); send a smaller file")


# Seconds a client is told to wait after an AuditError: a lock another program holds is often let go by then.
AUDIT_RETRY_AFTER_S = 5


# HTTP statuses that Starlette raises itself (routing, parsing), and their error_type.
HTTP_ERROR_TYPES = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
                    413: "UploadTooLarge", 503: "Overloaded"}


def error_response(scope: Scope, status: int, error_type: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape for the request in ``scope``, which also goes into its audit record."""
    state = scope.setdefault("state", {})
    record = state.get("audit")
    if record is not None:
        record.error_type, record.error = error_type, message
    state["error_type"] = error_type
    body = {"error": message, "error_type": error_type, "request_id": state.get("request_id", "")}
    return JSONResponse(body, status_code=status, headers=headers)

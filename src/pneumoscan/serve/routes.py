"""The endpoints: the page, health, metrics, and the ``/v1`` API (predict, model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Query, Request, Security
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from ..inference import InferenceFailure
from .errors import ApiError
from .metrics import KNOWN_METHODS
from .pool import Overloaded
from .schemas import Error, Health, ModelInfo, Prediction
from .settings import ServeSettings
from .upload import FIELD, NoFile, read_upload

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere; heatmaps arrive as data: URIs, previews as blob: URLs.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": [FIELD],
        "properties": {FIELD: {"type": "string", "format": "binary",
                               "description": "the radiograph: JPEG, PNG or DICOM (CR/DX), any file name"}}}},
    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
}}}
ERRORS = {status: {"model": Error, "description": text} for status, text in (
    (400, "no file, a malformed request, or the client left before its upload was complete"),
    (401, "missing or unknown API key (only with --api_key_file)"),
    (408, "the upload did not arrive within --request_timeout_s"),
    (413, "upload over --max_upload_mb"),
    (422, "unreadable image (ImageError) or not a frontal chest radiograph (OutOfScopeError)"),
    (500, "the model could not answer for a reason that is not the file's (InternalError): send it again"),
    (503, "busy or still loading: retry after the Retry-After header's seconds"),
)}

# The query parameters POST /v1/predict takes; any other is refused, so that a misspelt one is not ignored.
PREDICT_PARAMS = ("heatmap",)
PREDICT_CALL = (f"POST /v1/predict with the film as multipart field '{FIELD}' (or as the body with Content-Type "
                "application/dicom, image/jpeg or image/png)")
# What to call instead, for the API's paths; other known paths are named with the methods they take.
CALLS = {"/v1/predict": PREDICT_CALL, "/v1/model": "GET /v1/model"}
SHOWN_NAME_CHARS = 40

pages = APIRouter()


@pages.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


@pages.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """Liveness: 200 while the process runs (the model may still be loading)."""
    return Health(status="ok")


@pages.get("/readyz", response_model=Health, responses={503: {"model": Error}}, tags=["health"])
async def readyz(request: Request) -> Health:
    """Readiness: 200 once the model is loaded and the audit log can be written; 503 before, and after a failed
    audit commit until one succeeds (a probe for the log's write lock runs meanwhile)."""
    service = request.app.state.service
    service.require_ready()
    service.require_audit()
    return Health(status="ready", model_version=service.model_version)


@pages.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests by status, latency, predictions by class and risk, refusals by reason."""
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# HEAD, for uptime checks and probes that send it, as routes of their own outside /docs (one route with both
# methods puts one operation id twice into the OpenAPI document); registered after GET, so a 405's Allow from
# Starlette names GET, and the app's handler adds HEAD for these paths.
HEAD_ROUTES = {"/": page, "/healthz": healthz, "/readyz": readyz, "/metrics": metrics}
for _path, _endpoint in HEAD_ROUTES.items():
    pages.head(_path, include_in_schema=False)(_endpoint)


def v1_router(api_keys: bool) -> APIRouter:
    """The ``/v1`` API; with ``api_keys`` /docs shows the bearer scheme (the middleware enforces it)."""
    dependencies = [Security(HTTPBearer(auto_error=False, description="a key from --api_key_file"))] if api_keys \
        else []
    router = APIRouter(prefix="/v1", tags=["v1"], dependencies=dependencies)

    @router.post("/predict", response_model=Prediction, responses=ERRORS, openapi_extra=UPLOAD_BODY)
    async def predict(request: Request, heatmap: bool = Query(
            False, description="add the Grad-CAM overlay of the predicted class as a PNG data URI")) -> Prediction:
        """Predict pneumonia on one chest radiograph (multipart field `file`, or the raw image as the body)."""
        refuse_unknown_params(request, PREDICT_PARAMS)
        service = request.app.state.service
        pool = service.require_ready()
        record = request.state.audit
        try:
            with pool.admit() as ticket:
                upload = await _read_in_time(request, service.settings)
                record.input_sha256, record.input_bytes = upload.sha256, len(upload.data)
                outcome = await ticket.predict(upload.data, heatmap, service.settings.request_timeout_s)
        except Overloaded as exc:
            raise ApiError(503, "Overloaded", str(exc), {"Retry-After": str(exc.retry_after)}) from exc
        except NoFile as exc:
            raise ApiError(400, "NoFile", str(exc)) from exc
        result = outcome.result
        if isinstance(result, InferenceFailure):
            if result.error_type == "InferenceError":  # the service's fault, not the film's: 500, worth a retry
                raise ApiError(500, "InternalError", "the model could not answer for this film (an internal error, "
                                                     "not a fault of the file); the request id names it in the "
                                                     "server log: send it again, and report it if it stays")
            raise ApiError(422, result.error_type, reason(result.error))
        positive = service.class_names[-1]
        record.prediction, record.risk_level = result.prediction, result.risk_level
        record.probability = result.probabilities[positive]
        record.warnings = json.dumps(result.warnings)
        return Prediction(request_id=request.state.request_id, prediction=result.prediction,
                          confidence=result.confidence, probabilities=result.probabilities,
                          risk_level=result.risk_level, uncertainty=result.uncertainty,
                          processing_time=result.processing_time, timestamp=result.timestamp,
                          warnings=result.warnings, model_version=result.model_version, threshold=result.threshold,
                          calibrated=result.calibrated, view_position=result.view_position,
                          input_sha256=upload.sha256, heatmap=outcome.heatmap)

    @router.get("/model", response_model=ModelInfo, responses={401: ERRORS[401], 503: ERRORS[503]})
    async def model(request: Request) -> ModelInfo:
        """The model: version, threshold, temperature, intended use and its validation figures."""
        service = request.app.state.service
        service.require_ready()
        return ModelInfo(**service.model_info)

    return router


async def _read_in_time(request: Request, settings: ServeSettings):
    """The upload, at most ``max_upload_bytes``, read within ``request_timeout_s``: a stalled or vanished client
    frees its place in the queue.

    Raises:
        ApiError: 408 ``UploadTimeout`` when the body has not arrived in time; 400 ``ClientDisconnected`` when
            the client closed the connection before it was complete.
    """
    try:
        return await asyncio.wait_for(read_upload(request, settings.max_upload_bytes), settings.request_timeout_s)
    except asyncio.TimeoutError as exc:
        raise ApiError(408, "UploadTimeout", f"the upload did not arrive within {settings.request_timeout_s:g} s "
                                             f"(--request_timeout_s); send it again") from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "ClientDisconnected", "the client closed the connection before the upload was "
                                                  "complete; nothing was predicted") from exc


def refuse_unknown_params(request: Request, known: tuple[str, ...]) -> None:
    """Raises ApiError 400 ``BadRequest`` naming the query parameters not in ``known`` (each cut to a few
    characters: the answer goes into the audit log)."""
    unknown = [name for name in dict.fromkeys(request.query_params) if name not in known]
    if unknown:
        shown = ", ".join(repr(name[:SHOWN_NAME_CHARS]) for name in unknown)
        raise ApiError(400, "BadRequest", f"unknown query parameter {shown} for {request.method} {request.url.path}; "
                                          f"it takes {', '.join(known)} (e.g. ?heatmap=true)")


def not_found_message() -> str:
    """A 404's text: what the API's calls are (the unknown path is in the audit row, not repeated here)."""
    return f"no such path; the API is {PREDICT_CALL}, and GET /v1/model; the page is at /, its docs at /docs"


def method_not_allowed_message(method: str, path: str, allowed: list[str]) -> str:
    """A 405's text: the call to make on ``path`` instead (``path`` is one of the app's, so safe to repeat)."""
    call = CALLS.get(path) or " or ".join(f"{m} {path}" for m in allowed)
    shown = method if method in KNOWN_METHODS else "this method"
    return f"{path} does not take {shown}: use {call}; see /docs"


def reason(error: str) -> str:
    """An engine error without the ``<bytes>: `` it names an upload with: the CLI's reason text."""
    prefix = "<bytes>: "
    return error[len(prefix):] if error.startswith(prefix) else error

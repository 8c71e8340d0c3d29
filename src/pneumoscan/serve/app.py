"""``create_app(settings)``: the FastAPI app; the model loads in its lifespan, never at import.

At start-up the lifespan opens (and migrates) the audit log, then loads the model in a
thread: the server answers ``/healthz`` at once and ``/readyz`` (and ``/v1/*``) once the model
is in memory. A model that fails to load is logged and, under ``pneumoscan serve``, stops
the server with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__
from ..errors import PneumoscanError
from .audit import AuditLog
from .auth import ApiKeys
from .errors import AUDIT_RETRY_AFTER_S, HTTP_ERROR_TYPES, ApiError, error_response
from .metrics import ServiceMetrics
from .middleware import ServiceMiddleware
from .pool import InferencePool
from .routes import HEAD_ROUTES, STATIC_DIR, method_not_allowed_message, not_found_message, pages, v1_router
from .settings import ServeSettings

log = logging.getLogger(__name__)

INTENDED_USE = ("Screening aid for a clinician: flags frontal (PA/AP) chest radiographs of children aged 1-5 "
                "that likely show pneumonia, as JPEG, PNG or DICOM (CR/DX). Not validated on adults, lateral "
                "views or other hospitals' films; see MODEL_CARD.md.")
NOTICE = ("Not a diagnostic device. A clinician reads every film; do not use this output to rule pneumonia "
          "out on its own.")


def load_engine(settings: ServeSettings):
    """The default engine factory: ``MedicalImageInference`` on ``settings.model_path`` (None: the shipped model)."""
    from ..inference import MedicalImageInference

    backend = {} if settings.backend is None else {"backend": settings.backend}
    return MedicalImageInference(settings.model_path, device=settings.device, batch_size=settings.max_batch,
                                 decode_workers=settings.decode_workers, **backend)


class Service:
    """What the routes and the middleware share, held on ``app.state.service``."""

    def __init__(self, settings: ServeSettings, engine_factory: Callable[[ServeSettings], object]) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.keys = ApiKeys.from_file(settings.api_key_file) if settings.api_key_file else None
        self.metrics = ServiceMetrics()
        self.audit: AuditLog | None = None
        self.pool: InferencePool | None = None
        self.load_error: str | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self.model_version: str | None = None
        self.threshold: float | None = None
        self.class_names: list[str] = []
        self.model_info: dict = {}

    @property
    def ready(self) -> bool:
        return self.pool is not None

    def require_ready(self) -> InferencePool:
        """The pool, or ApiError 503 while the model loads (or after it failed to)."""
        if self.pool is None:
            message = (f"model failed to load: {self.load_error}" if self.load_error
                       else "model is loading; retry in a moment")
            raise ApiError(503, "NotReady", message, {"Retry-After": "2"})
        return self.pool

    def require_audit(self) -> None:
        """Nothing while the audit log can be written; after a failed commit, until a commit succeeds again,
        ApiError 503 ``AuditError`` (and a probe of the log, so that readiness comes back without traffic);
        also while its disk has less free space than ``audit_min_free_mb`` (``AuditLog.space_problem``)."""
        if self.audit is None:
            return
        failure = self.audit.failure
        if failure is not None:
            self.audit.probe()
            raise ApiError(503, "AuditError", f"{failure}; predictions are refused until it can be written again",
                           {"Retry-After": str(AUDIT_RETRY_AFTER_S)})
        space = self.audit.space_problem()
        if space is not None:
            raise ApiError(503, "AuditError", f"{space}; not ready, though predictions are answered while rows "
                           "can still be written", {"Retry-After": str(AUDIT_RETRY_AFTER_S)})

    def load(self) -> None:
        """Load one engine per worker and start the pool (runs in a thread). Any failure, also after the
        engines are built (an odd checkpoint's metadata), ends in ``load_error`` and ``on_load_failure``:
        never a service that says "loading" for ever."""
        try:
            self._load()
        except Exception as exc:  # a bad checkpoint, a missing CUDA device...: the service cannot serve
            self.load_error = str(exc) or type(exc).__name__
            log.error("model not loaded: %s", self.load_error, exc_info=not isinstance(exc, PneumoscanError))
            if self.on_load_failure is not None:
                self.on_load_failure()

    def _load(self) -> None:
        t0 = time.perf_counter()
        settings = self.settings
        engines = [self.engine_factory(settings) for _ in range(settings.workers)]
        from matplotlib import colormaps  # noqa: F401  (now rather than in the first heatmap request: ~1 s)

        engine = engines[0]
        info = engine.info
        checkpoint = getattr(engine, "checkpoint", {})
        self.model_version, self.threshold = info["model_version"], info["threshold"]
        self.class_names = list(info["class_names"])
        self.model_info = {
            **{k: info[k] for k in ("model_version", "arch", "image_size", "class_names", "threshold",
                                    "temperature", "calibrated", "out_of_scope_gate")},
            "intensity": info.get("intensity", "raw"), "intended_use": INTENDED_USE, "notice": NOTICE,
            "validation_metrics": {k.removeprefix("val_"): float(v)  # numbers only (a mid-training file nests them)
                                   for k, v in (checkpoint.get("metrics") or {}).items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "training_note": checkpoint.get("training_note"),
            "backend": info.get("backend"), "detail_check": bool(info.get("detail_check")),
            "calibration_bias": float(info.get("calibration_bias") or 0.0),
            "max_upload_mb": settings.max_upload_mb, "workers": settings.workers,
        }
        pool = InferencePool(engines, settings.max_batch, settings.batch_wait_ms, settings.max_queue,
                             settings.heatmap_max_side, on_batch=self.metrics.batch_size.observe)
        self.metrics.in_progress.set_function(lambda: pool.admitted)
        self.metrics.model.labels(self.model_version).set(1)
        self.pool = pool
        log.info("model %s loaded in %.1f s (%d worker(s), threshold %.4f, device %s, backend %s); ready",
                 self.model_version, time.perf_counter() - t0, settings.workers, self.threshold,
                 getattr(engine, "device", "?"), info.get("backend", "torch"))


def create_app(settings: ServeSettings, engine_factory: Callable[[ServeSettings], object] | None = None) -> FastAPI:
    """The service for ``settings``.

    Args:
        settings: the validated configuration.
        engine_factory: builds one engine per worker from the settings (default ``load_engine``;
            tests pass stand-ins).

    Raises:
        ValueError: the API key file is invalid (see ``auth.ApiKeys.from_file``).
    """
    service = Service(settings, engine_factory or load_engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.audit = AuditLog(settings.audit_db, int(settings.audit_min_free_mb * 2**20))
        log.info("audit log: %s", service.audit.path.resolve())
        if (space := service.audit.space_problem()) is not None:
            log.warning("%s: /readyz answers 503 until then", space)
        loading = asyncio.create_task(asyncio.to_thread(service.load))
        try:
            yield
        finally:
            await loading
            if service.pool is not None:
                service.pool.close()
            service.audit.close()
            log.info("stopped; audit log closed")

    # /docs is served from local copies of Swagger UI (swagger-ui-bundle), not FastAPI's default CDN:
    # a hospital network often has no internet
    app = FastAPI(title="pneumoscan", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Pneumonia screening on pediatric chest X-rays. " + NOTICE)
    app.state.service = service
    app.add_middleware(ServiceMiddleware, service=service)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request.scope, exc.status, exc.error_type, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        status, headers, message = exc.status_code, exc.headers, str(exc.detail)
        if status == 405:
            allowed = allowed_methods(request.url.path, (headers or {}).get("Allow", ""))
            headers = {**(headers or {}), "Allow": ", ".join([*allowed, "OPTIONS"])}
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
            message = method_not_allowed_message(request.method, request.url.path, allowed)
        elif status == 404:
            message = not_found_message()
        return error_response(request.scope, status, HTTP_ERROR_TYPES.get(status, "HTTPError"), message, headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(validation_problem(e) for e in exc.errors())
        return error_response(request.scope, 400, "BadRequest", problems or "invalid request")

    app.include_router(pages)
    app.include_router(v1_router(service.keys is not None))
    _offline_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def allowed_methods(path: str, allow: str) -> list[str]:
    """The methods ``path`` takes: Starlette's ``Allow`` (the first route on the path), HEAD where a HEAD route
    of its own stands beside the GET, and GET and HEAD under /static (StaticFiles' 405 names none)."""
    methods = {m.strip() for m in allow.split(",") if m.strip()}
    if path in HEAD_ROUTES:
        methods.add("HEAD")
    if not methods and path.startswith("/static/"):
        methods = {"GET", "HEAD"}
    return sorted(methods)


def validation_problem(error: dict) -> str:
    """One of FastAPI's validation errors in words; a query flag that is not a boolean says which values are."""
    where = error.get("loc", ())
    if error.get("type") == "bool_parsing" and len(where) == 2 and where[0] == "query":
        return f"query parameter {where[1]} is not true or false: use {where[1]}=true or {where[1]}=false"
    return f"{'.'.join(str(p) for p in where)}: {error.get('msg')}"


def _offline_docs(app: FastAPI) -> None:
    """OpenAPI docs at /docs with Swagger UI's files served by the app itself (no CDN)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="pneumoscan API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")

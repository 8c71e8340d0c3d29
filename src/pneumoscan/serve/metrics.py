"""Prometheus metrics of one app (their own registry, so that several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Paths named in metric labels; anything else is counted as "other" so labels stay few.
KNOWN_PATHS = ("/", "/healthz", "/readyz", "/metrics", "/v1/predict", "/v1/model", "/docs", "/openapi.json")
# Methods named in metric labels (RFC 9110's and PATCH); any other token a client sends is counted as "other".
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def path_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    return "/static" if path.startswith("/static/") else "other"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class ServiceMetrics:
    """The service's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pneumoscan_http_requests", "HTTP requests by method, path and status",
                                ("method", "path", "status"), registry=r)
        self.latency = Histogram("pneumoscan_http_request_duration_seconds",
                                 "Time from request to response start", ("path",), buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.predictions = Counter("pneumoscan_predictions", "Predictions by class and risk level",
                                   ("prediction", "risk_level"), registry=r)
        self.refusals = Counter("pneumoscan_refusals", "Refused /v1 requests by reason (the error_type)",
                                ("reason",), registry=r)
        self.batch_size = Histogram("pneumoscan_inference_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.in_progress = Gauge("pneumoscan_requests_admitted", "Prediction requests admitted and not finished",
                                 registry=r)
        self.audit_seconds = Histogram("pneumoscan_audit_commit_seconds", "Wait for the audit row's commit",
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                                       registry=r)
        self.model = Gauge("pneumoscan_model_info", "The loaded model (value 1)", ("model_version",), registry=r)

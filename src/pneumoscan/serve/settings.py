"""The service's configuration: one dataclass, validated when built, that ``create_app`` takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_AUDIT_DB = "pneumoscan_audit.sqlite3"
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


@dataclass
class ServeSettings:
    """Everything ``pneumoscan serve`` can be told; CLI flags map one to one onto these fields.

    Attributes:
        host: address to listen on; loopback by default (put a TLS reverse proxy in front to expose it).
        port: TCP port.
        model_path: a checkpoint from ``pneumoscan train``; None uses the shipped model.
        audit_db: the SQLite audit log (created, or migrated, at start-up).
        audit_min_free_mb: ``/readyz`` answers 503 while the audit log's file system has less free space than
            this (MiB), so that a load balancer moves traffic away before a full disk stops every answer.
        api_key_file: when set, every ``/v1/*`` call needs ``Authorization: Bearer <key>`` (see ``auth``).
        max_upload_mb: request bodies above this many MiB are refused with 413 while streaming.
        workers: inference workers; each holds its own copy of the model (the engine is not
            thread-safe, so copies are never shared) and runs one forward pass at a time.
        max_batch: at most this many queued requests go through one forward pass (1: no micro-batching).
        batch_wait_ms: how long a worker waits for requests that are still uploading before it
            runs a batch that is not full; it never waits when nothing else is on its way.
        max_queue: requests admitted at once (uploading, queued or being predicted); one more is
            answered 503 with Retry-After. Memory in use is at most about max_queue x max_upload_mb.
        request_timeout_s: an upload not received within this long gets 408, a request whose prediction has
            not finished after this long gets 503.
        header_timeout_s: a connection that has not sent a request's complete headers this long after it
            opened (or after the first byte of its next request) is closed, so idle sockets cannot fill the
            server's connection limit.
        device: ``auto``, ``cpu`` or ``cuda``.
        backend: what runs the model (the engine's ``backend``: ``auto``, ``torch``, ``onnx``,
            ``onnx-int8``); None leaves the engine's default.
        decode_workers: threads decoding the images of a batch (the engine's ``decode_workers``).
        heatmap_max_side: longest side, in pixels, of the heatmap PNG returned with ``?heatmap=true``.
        forwarded_allow_ips: proxies whose X-Forwarded-For/-Proto headers are trusted (uvicorn's option),
            so that the audit log records the real client address behind a reverse proxy.
        verbose: debug logging.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_path: str | None = None
    audit_db: str = DEFAULT_AUDIT_DB
    audit_min_free_mb: float = 64.0
    api_key_file: str | None = None
    max_upload_mb: float = 50.0
    workers: int = 1
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 32
    request_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    device: str = "auto"
    backend: str | None = None
    decode_workers: int = 2
    heatmap_max_side: int = 512
    forwarded_allow_ips: str = "127.0.0.1"
    verbose: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise ValueError(f"model_path {self.model_path!r} does not exist or is not a file; "
                             "leave it out to use the shipped model")
        if not self.audit_db:
            raise ValueError("audit_db must name a SQLite file, e.g. pneumoscan_audit.sqlite3")
        if Path(self.audit_db).is_dir():
            raise ValueError(f"audit_db {self.audit_db!r} is a folder; give a file name inside it")
        if not 0 <= self.audit_min_free_mb <= 1024 * 1024:
            raise ValueError(f"audit_min_free_mb must be between 0 and 1048576 (1 TiB), got {self.audit_min_free_mb}")
        if self.api_key_file is not None and not Path(self.api_key_file).is_file():
            raise ValueError(f"api_key_file {self.api_key_file!r} does not exist or is not a file")
        if not 0 < self.max_upload_mb <= 1024:
            raise ValueError(f"max_upload_mb must be above 0 and at most 1024, got {self.max_upload_mb}")
        for name, low in (("workers", 1), ("max_batch", 1), ("max_queue", 1), ("decode_workers", 0),
                          ("heatmap_max_side", 64)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be between 0 and 1000, got {self.batch_wait_ms}")
        for name in ("request_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose one of auto, cpu, cuda")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

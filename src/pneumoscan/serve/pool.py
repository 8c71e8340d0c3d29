"""Bounded, micro-batching inference off the event loop.

Each worker thread owns one engine (the engine is not thread-safe, so a model is never used
by two threads). Requests are admitted up to ``max_queue`` at once, counting those still
uploading; one more is refused at once (``Overloaded``, answered 503) rather than left to
wait. A worker takes every request already queued, up to ``max_batch``, and runs them
through one forward pass; when fewer than ``max_batch`` are queued but more admitted
requests are still uploading, it waits up to ``batch_wait_ms`` for them. A lone request
never waits.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from ..heatmap import overlay_png
from ..inference import InferenceFailure, InferenceResult
from ..preprocess import decode_image

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More requests are admitted than the service holds; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Outcome:
    """What a worker returns for one request: the engine's outcome and, if asked for, the heatmap."""

    result: InferenceResult | InferenceFailure
    heatmap: str | None = None
    batch_size: int = 1


@dataclass
class _Job:
    data: bytes
    heatmap: bool
    future: Future


def heatmap_data_uri(engine, data: bytes, target_class: int, max_side: int) -> str:
    """The Grad-CAM overlay of ``target_class`` on encoded image ``data``, as a PNG data URI at most ``max_side`` px.

    The map is computed from the image as the model saw it and drawn on the original,
    reduced to ``max_side`` first (the engine's ``heatmap_data_uri`` takes paths only).

    Raises:
        ImageError: ``data`` cannot be decoded.
        ValueError: the overlay cannot be drawn.
    """
    decoded = decode_image(data, engine.image_size)
    cam = engine.gradcam(decoded, target_class)
    # a JPEG was decoded at reduced scale for the model (draft mode); DICOM is always at full size
    gray = decoded.gray if decoded.dicom is not None else decode_image(data).gray
    gray.thumbnail((max_side, max_side), Image.BILINEAR)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-heatmap-") as tmp:
        path = Path(tmp) / "heatmap.png"
        overlay_png(gray, cam, path)
        png = path.read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Ticket:
    """An admitted request's place in the pool: ``with pool.admit() as ticket: await ticket.predict(...)``."""

    def __init__(self, pool: InferencePool) -> None:
        self._pool = pool
        self.submitted = False

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self._pool._release(self)

    async def predict(self, data: bytes, heatmap: bool, timeout: float) -> Outcome:
        """Queue the image and wait for its ``Outcome`` without blocking the event loop.

        Raises:
            Overloaded: no result within ``timeout`` seconds.
        """
        future = self._pool._submit(self, data, heatmap)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError as exc:
            future.cancel()
            raise Overloaded(f"no prediction within {timeout:g} s; the service is overloaded", 5) from exc


class InferencePool:
    """Worker threads, one engine each, fed from one queue.

    Args:
        engines: one loaded engine per worker (``MedicalImageInference`` or anything with
            ``predict_batch``, ``gradcam``, ``image_size`` and ``class_names``).
        max_batch, batch_wait_ms, max_queue, heatmap_max_side: see ``ServeSettings``.
        on_batch: called with each batch's size (for metrics).
    """

    def __init__(self, engines: list, max_batch: int = 16, batch_wait_ms: float = 5.0, max_queue: int = 32,
                 heatmap_max_side: int = 512, on_batch: Callable[[int], None] | None = None) -> None:
        if not engines:
            raise ValueError("InferencePool needs at least one engine")
        self.engines = engines
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.heatmap_max_side = heatmap_max_side
        self._on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # admitted and not finished
        self._arriving = 0  # admitted, not yet submitted (still uploading)
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, args=(engine,), name=f"pneumoscan-infer-{i}",
                                          daemon=True) for i, engine in enumerate(engines)]
        for t in self._threads:
            t.start()

    @property
    def admitted(self) -> int:
        """Requests admitted and not finished (uploading, queued or being predicted)."""
        return self._admitted

    def admit(self) -> Ticket:
        """One of the ``max_queue`` places, held until the returned ticket's ``with`` block ends.

        Raises:
            Overloaded: every place is taken, or the pool is shutting down.
        """
        with self._lock:
            if self._stopping:
                raise Overloaded("the service is shutting down")
            if self._admitted >= self.max_queue:
                raise Overloaded(f"the service is busy ({self._admitted} requests in progress, the most it "
                                 f"holds); try again shortly")
            self._admitted += 1
            self._arriving += 1
        return Ticket(self)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._admitted -= 1
            if not ticket.submitted:
                self._arriving -= 1

    def _submit(self, ticket: Ticket, data: bytes, heatmap: bool) -> Future:
        future: Future = Future()
        with self._lock:
            ticket.submitted = True
            self._arriving -= 1
        self._queue.put(_Job(data, heatmap, future))
        return future

    def close(self) -> None:
        """Stop the workers after the jobs already queued; requests admitted later are refused."""
        with self._lock:
            self._stopping = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and whatever joins it within the rules in the module docstring; True if a stop was seen."""
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._arriving <= 0 or remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _work(self, engine) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._run(engine, batch)
            if stop:
                return

    def _run(self, engine, batch: list[_Job]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            outcomes = engine.predict_batch([job.data for job in batch])
        except Exception as exc:  # the engine isolates bad inputs; this is a bug or a broken device
            log.exception("inference failed for a batch of %d", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        later = []
        for job, outcome in zip(batch, outcomes):
            if job.heatmap and isinstance(outcome, InferenceResult):
                later.append((job, outcome))
            else:
                job.future.set_result(Outcome(outcome, None, len(batch)))
        for job, outcome in later:  # after the others are answered: Grad-CAM costs a forward and a backward pass
            job.future.set_result(Outcome(outcome, self._heatmap(engine, job.data, outcome), len(batch)))

    def _heatmap(self, engine, data: bytes, result: InferenceResult) -> str | None:
        try:
            return heatmap_data_uri(engine, data, engine.class_names.index(result.prediction),
                                    self.heatmap_max_side)
        except (ImageError, ValueError, OSError) as exc:
            result.warnings.append(f"heatmap not made: {exc}")
            log.warning("heatmap not made (%s)", exc)
            return None
        except Exception:  # e.g. a GPU out of memory in Grad-CAM: the answer stands, and the worker lives on
            log.exception("heatmap failed")
            result.warnings.append("heatmap not made: internal error (see the server log)")
            return None


"""The service in-process (``create_app`` + TestClient) with stand-in engines whose timing the tests control.

These cover what a real model makes hard to provoke: a model still loading or failing to
load, a full queue, a timeout, an engine crash, an audit log that cannot be written, and
exactly how queued requests are batched.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from serve_process import audit_row

from pneumoscan.errors import CheckpointError
from pneumoscan.inference import InferenceFailure, InferenceResult
from pneumoscan.serve.app import create_app
from pneumoscan.serve.audit import AuditError
from pneumoscan.serve.auth import ApiKeys
from pneumoscan.serve.cli import serve_main
from pneumoscan.serve.settings import ServeSettings


class StubEngine:
    """Answers PNEUMONIA for any bytes but b"bad"; with ``release``, each batch waits for that event."""

    image_size = 224
    class_names = ["NORMAL", "PNEUMONIA"]
    device = "stub"

    def __init__(self, release: threading.Event | None = None, fail: Exception | None = None) -> None:
        self.release = release
        self.fail = fail
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.checkpoint = {"metrics": {"val_auroc": 0.95}, "training_note": "stub"}
        self.info = {"model_path": "stub", "model_version": "stub-1", "arch": "stub", "image_size": 224,
                     "threshold": 0.5, "temperature": 1.0, "calibrated": True, "class_names": self.class_names,
                     "out_of_scope_gate": True}

    def predict_batch(self, sources: list[bytes]) -> list:
        self.batches.append(len(sources))
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(20), "test never released the engine"
        if self.fail is not None:
            raise self.fail
        return [InferenceFailure("<bytes>", "<bytes>: not a recognised image", "ImageError") if s == b"bad"
                else InferenceResult("PNEUMONIA", 0.9, {"NORMAL": 0.1, "PNEUMONIA": 0.9}, "MEDIUM", 0.47, 0.01,
                                     "2026-01-01T00:00:00+00:00", None, 0.5, True, "stub-1")
                for s in sources]


def settings(tmp_path, **overrides) -> ServeSettings:
    return ServeSettings(audit_db=str(tmp_path / "audit.sqlite3"), **overrides)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def ready_client(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    wait_until(lambda: client.get("/readyz").status_code == 200)
    return client


def post(client, data: bytes = b"image"):
    return client.post("/v1/predict", files={"file": ("x.jpg", data)})


def test_live_before_ready_then_ready(tmp_path):
    loaded = threading.Event()
    engine = StubEngine()

    def slow_factory(_settings):
        assert loaded.wait(20)
        return engine

    s = settings(tmp_path)
    with TestClient(create_app(s, slow_factory)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error_type"] == "NotReady"
        refused = post(client)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        row = audit_row(s.audit_db, refused.json()["request_id"])
        assert (row["status"], row["error_type"], row["model_version"]) == (503, "NotReady", None)
        loaded.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        ok = post(client)
        assert ok.status_code == 200 and ok.json()["model_version"] == "stub-1"
        assert audit_row(s.audit_db, ok.json()["request_id"])["model_version"] == "stub-1"


def test_model_that_fails_to_load_is_reported(tmp_path):
    def broken(_settings):
        raise CheckpointError("m.pth: not a pneumoscan checkpoint")

    app = create_app(settings(tmp_path), broken)
    stopped = threading.Event()
    app.state.service.on_load_failure = stopped.set
    with TestClient(app) as client:
        assert stopped.wait(20)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"] == "model failed to load: m.pth: not a pneumoscan checkpoint"


def test_a_failure_after_the_engines_are_built_is_reported_not_loading_for_ever(tmp_path):
    engine = StubEngine()
    engine.info = {k: v for k, v in engine.info.items() if k != "class_names"}  # e.g. odd checkpoint metadata
    app = create_app(settings(tmp_path), lambda _: engine)
    stopped = threading.Event()
    app.state.service.on_load_failure = stopped.set
    with TestClient(app) as client:
        assert stopped.wait(20)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"].startswith("model failed to load")


def test_a_mid_training_checkpoint_s_nested_metrics_do_not_stop_the_service(tmp_path):
    engine = StubEngine()
    engine.checkpoint = {"metrics": {"val": {"auroc": 0.9}, "val_auroc": 0.95}, "training_note": None}
    client = ready_client(create_app(settings(tmp_path), lambda _: engine))
    try:
        assert client.get("/v1/model").json()["validation_metrics"] == {"auroc": 0.95}
    finally:
        client.__exit__(None, None, None)


def test_full_queue_is_503_with_retry_after_not_a_hang(tmp_path):
    release = threading.Event()
    engine = StubEngine(release)
    s = settings(tmp_path, max_queue=2)
    client = ready_client(create_app(s, lambda _: engine))
    pool = client.app.state.service.pool
    try:
        with ThreadPoolExecutor(2) as threads:
            held = [threads.submit(post, client) for _ in range(2)]
            wait_until(lambda: pool.admitted == 2 and engine.entered.is_set())
            t0 = time.monotonic()
            refused = post(client)
            assert time.monotonic() - t0 < 5
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            body = refused.json()
            assert body["error_type"] == "Overloaded" and "busy" in body["error"]
            assert audit_row(s.audit_db, body["request_id"])["status"] == 503
            release.set()
            assert [f.result().status_code for f in held] == [200, 200]
    finally:
        release.set()
        client.__exit__(None, None, None)


@pytest.mark.parametrize("max_batch, expected", [(4, [1, 4, 2]), (1, [1] * 7)])
def test_queued_requests_share_forward_passes(tmp_path, max_batch, expected):
    release = threading.Event()
    engine = StubEngine(release)
    client = ready_client(create_app(settings(tmp_path, max_batch=max_batch), lambda _: engine))
    pool = client.app.state.service.pool
    try:
        with ThreadPoolExecutor(7) as threads:
            first = threads.submit(post, client)
            wait_until(engine.entered.is_set)  # the first request is in the model...
            rest = [threads.submit(post, client) for _ in range(6)]
            wait_until(lambda: pool._queue.qsize() == 6)  # ...and six more wait in the queue
            release.set()
            assert {f.result().status_code for f in [first, *rest]} == {200}
    finally:
        release.set()
        client.__exit__(None, None, None)
    assert engine.batches == expected


def test_workers_each_run_their_own_engine_at_once(tmp_path):
    release = threading.Event()
    engines: list[StubEngine] = []

    def factory(_settings):
        engines.append(StubEngine(release))
        return engines[-1]

    # max_batch 1: otherwise the first worker may take both requests into one micro-batch
    client = ready_client(create_app(settings(tmp_path, workers=2, max_batch=1), factory))
    try:
        assert len(engines) == 2
        with ThreadPoolExecutor(2) as threads:
            answers = [threads.submit(post, client) for _ in range(2)]
            wait_until(lambda: all(e.entered.is_set() for e in engines))  # both models busy at the same time
            release.set()
            assert [a.result().status_code for a in answers] == [200, 200]
        assert client.get("/v1/model").json()["workers"] == 2
    finally:
        release.set()
        client.__exit__(None, None, None)


def test_a_lone_request_does_not_wait_for_a_batch(tmp_path):
    engine = StubEngine()
    client = ready_client(create_app(settings(tmp_path, batch_wait_ms=1000), lambda _: engine))
    try:
        t0 = time.monotonic()
        assert post(client).status_code == 200
        assert time.monotonic() - t0 < 0.9, "waited batch_wait_ms although no other request was on its way"
    finally:
        client.__exit__(None, None, None)


def test_prediction_timeout_is_503(tmp_path):
    release = threading.Event()
    client = ready_client(create_app(settings(tmp_path, request_timeout_s=0.3), lambda _: StubEngine(release)))
    try:
        response = post(client)
        assert response.status_code == 503 and response.json()["error_type"] == "Overloaded"
        assert "no prediction within 0.3 s" in response.json()["error"]
    finally:
        release.set()
        client.__exit__(None, None, None)


def test_engine_crash_is_500_in_the_error_shape(tmp_path):
    s = settings(tmp_path)
    client = ready_client(create_app(s, lambda _: StubEngine(fail=RuntimeError("device lost"))))
    try:
        response = post(client)
        assert response.status_code == 500
        body = response.json()
        assert body["error_type"] == "InternalError" and body["request_id"] == response.headers["X-Request-ID"]
        assert "device lost" not in body["error"]
        assert audit_row(s.audit_db, body["request_id"])["status"] == 500
    finally:
        client.__exit__(None, None, None)


def test_a_heatmap_that_crashes_keeps_the_answer_and_the_worker(tmp_path, monkeypatch):
    import pneumoscan.serve.pool as pool_mod

    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(pool_mod, "heatmap_data_uri", broken)
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    try:
        first = client.post("/v1/predict?heatmap=true", files={"file": ("x.jpg", b"image")})
        assert first.status_code == 200 and first.json()["heatmap"] is None
        assert any("heatmap not made" in w for w in first.json()["warnings"])
        assert post(client).status_code == 200  # the worker thread is still there
    finally:
        client.__exit__(None, None, None)


def test_an_unexpected_error_in_the_audit_writer_is_an_audit_error_not_a_hang(tmp_path):
    from pneumoscan.serve.audit import AuditLog, AuditRecord

    log = AuditLog(tmp_path / "a.sqlite3")
    try:
        bad = log.submit(object())  # not a record: dataclasses.astuple raises TypeError
        with pytest.raises(AuditError):
            bad.result(10)
        good = AuditRecord("r1", "2026-01-01T00:00:00+00:00", "POST", "/v1/predict", status=200)
        assert log.submit(good).result(10) is None  # the writer thread lives on
    finally:
        log.close()


def test_refusal_reason_drops_the_bytes_name(tmp_path):
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    try:
        response = post(client, b"bad")
        assert response.status_code == 422
        assert response.json()["error"] == "not a recognised image"
    finally:
        client.__exit__(None, None, None)


def test_no_answer_without_an_audit_row(tmp_path):
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    service = client.app.state.service

    def failing_submit(_record) -> Future:
        future: Future = Future()
        future.set_exception(AuditError("audit log cannot be written (disk I/O error)"))
        return future

    try:
        service.audit.submit = failing_submit
        response = post(client)
        assert response.status_code == 503
        assert response.json()["error_type"] == "AuditError" and "prediction" not in response.json()
        assert client.get("/healthz").status_code == 200  # not audited, still answered
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("overrides, match", [
    ({"port": 70000}, "port"), ({"max_upload_mb": 0}, "max_upload_mb"), ({"workers": 0}, "workers"),
    ({"max_batch": 0}, "max_batch"), ({"max_queue": 0}, "max_queue"), ({"batch_wait_ms": -1}, "batch_wait_ms"),
    ({"request_timeout_s": 0}, "request_timeout_s"), ({"device": "tpu"}, "auto, cpu, cuda"),
    ({"backend": "tensorrt"}, "auto, torch, onnx, onnx-int8"),
    ({"model_path": "/no/such/model.pth"}, "model_path"), ({"api_key_file": "/no/such/keys"}, "api_key_file"),
    ({"audit_db": ""}, "audit_db"),
])
def test_settings_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        ServeSettings(**overrides)


def test_serve_main_refuses_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--max_upload_mb", "0", "--audit_db", str(tmp_path / "a.db")])
    assert exit_.value.code == 2 and "max_upload_mb" in capsys.readouterr().err
    keys = tmp_path / "keys"
    keys.write_text("short\n")
    assert serve_main(["--api_key_file", str(keys), "--audit_db", str(tmp_path / "a.db")]) == 2


VALID_KEY = "0123456789abcdef0123"


@pytest.mark.parametrize("text, error", [
    ("", "holds no key"), ("# only a comment\n\n", "holds no key"), ("ward short\n", ":1: key is shorter"),
    (f"a {VALID_KEY}\na {VALID_KEY}x\n", ":2: key id 'a' is used twice"),
    (f"a {VALID_KEY}\nb {VALID_KEY}\n", ":2: this key is already listed"),
    (f"a b {VALID_KEY}\n", ":1: expected"),
])
def test_api_key_file_errors_name_the_line_not_the_key(tmp_path, text, error):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as caught:
        ApiKeys.from_file(path)
    assert VALID_KEY not in str(caught.value) and "short\n" not in str(caught.value)


def test_api_keys_match_by_id(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\npacs {VALID_KEY}\n\n  {VALID_KEY}-second  \n")
    keys = ApiKeys.from_file(path)
    assert keys.key_id(f"Bearer {VALID_KEY}") == "pacs"
    assert keys.key_id(f"bearer   {VALID_KEY}-second") is not None
    assert keys.key_id(f"Bearer {VALID_KEY}-second").startswith("key-")
    for header in (None, "", "Bearer", f"Basic {VALID_KEY}", f"Bearer {VALID_KEY}x", VALID_KEY):
        assert keys.key_id(header) is None, header


def test_every_setting_has_its_flag():
    import dataclasses

    from pneumoscan.serve.cli import _serve_parser

    flags = {a.dest for a in _serve_parser()._actions}
    assert {f.name for f in dataclasses.fields(ServeSettings)} <= flags


def test_readiness_is_503_while_the_audit_log_cannot_be_written_and_comes_back_without_traffic(tmp_path, monkeypatch):
    import sqlite3

    import pneumoscan.serve.audit as audit_mod

    monkeypatch.setattr(audit_mod, "WRITE_BUSY_TIMEOUT_S", 0.2)  # how long a commit waits for the other's lock
    s = settings(tmp_path)
    client = ready_client(create_app(s, lambda _: StubEngine()))
    other = sqlite3.connect(s.audit_db, isolation_level=None)  # another program holding the write lock
    try:
        other.execute("BEGIN EXCLUSIVE")
        refused = post(client)
        assert refused.status_code == 503 and refused.json()["error_type"] == "AuditError"
        headers = refused.headers
        assert headers["X-Request-ID"] == refused.json()["request_id"]
        assert (headers["Cache-Control"], headers["X-Content-Type-Options"]) == ("no-store", "nosniff")
        assert int(headers["Retry-After"]) >= 1
        for _ in range(3):  # and stays so, probes or not, while the lock is held
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error_type"] == "AuditError", ready.text
            assert int(ready.headers["Retry-After"]) >= 1 and "cannot be written" in ready.json()["error"]
            time.sleep(0.3)
        other.execute("ROLLBACK")
        wait_until(lambda: client.get("/readyz").status_code == 200)  # the probe found the lock free: no request
        assert post(client).status_code == 200
    finally:
        other.close()
        client.__exit__(None, None, None)


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/metrics"])
def test_head_and_options_on_the_page_and_health_endpoints(tmp_path, path):
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    try:
        get, head = client.get(path), client.head(path)
        assert (get.status_code, head.status_code) == (200, 200)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["X-Request-ID"]
        options = client.options(path)
        assert options.status_code == 204 and options.headers["Allow"] == "GET, HEAD, OPTIONS"
        wrong = client.put(path)
        assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET, HEAD, OPTIONS"
        assert f"use GET {path} or HEAD {path}" in wrong.json()["error"]
    finally:
        client.__exit__(None, None, None)


def test_head_is_not_a_second_operation_in_the_api_docs(tmp_path, recwarn):
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    try:
        spec = client.get("/openapi.json").json()
        assert set(spec["paths"]["/healthz"]) == {"get"} and "/" not in spec["paths"]
        assert not [w for w in recwarn if "Duplicate Operation ID" in str(w.message)]
    finally:
        client.__exit__(None, None, None)


def test_an_unknown_method_is_counted_as_other_so_metrics_stay_bounded(tmp_path):
    client = ready_client(create_app(settings(tmp_path), lambda _: StubEngine()))
    try:
        for method in ("XYZ1", "XYZ2", "BREW"):
            assert client.request(method, "/healthz").status_code == 405
        text = client.get("/metrics").text
        assert "XYZ1" not in text and "BREW" not in text
        assert 'pneumoscan_http_requests_total{method="other",path="/healthz",status="405"} 3.0' in text
    finally:
        client.__exit__(None, None, None)


def test_query_errors_say_what_to_send(tmp_path):
    s = settings(tmp_path)
    client = ready_client(create_app(s, lambda _: StubEngine()))
    try:
        bad = client.post("/v1/predict?heatmap=maybe", files={"file": ("x.jpg", b"image")})
        assert bad.status_code == 400 and bad.json()["error_type"] == "BadRequest"
        assert "use heatmap=true or heatmap=false" in bad.json()["error"]
        unknown = client.post("/v1/predict?heatmaps=true&x=" + "y" * 500, files={"file": ("x.jpg", b"image")})
        assert unknown.status_code == 400 and unknown.json()["error_type"] == "BadRequest"
        assert "unknown query parameter 'heatmaps', 'x'" in unknown.json()["error"]
        assert "it takes heatmap" in unknown.json()["error"]
        assert audit_row(s.audit_db, unknown.json()["request_id"])["error_type"] == "BadRequest"
        assert client.post("/v1/predict?heatmap=true", files={"file": ("x.jpg", b"image")}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_api_key_file_with_a_byte_order_mark_matches_its_first_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{VALID_KEY}\npacs {VALID_KEY}-second\n", encoding="utf-8-sig")  # as Windows Notepad saves
    assert ApiKeys.from_file(path).key_id(f"Bearer {VALID_KEY}") is not None
    path.write_text(f"pacs {VALID_KEY}\n", encoding="utf-8-sig")
    assert ApiKeys.from_file(path).key_id(f"Bearer {VALID_KEY}") == "pacs"


@pytest.mark.parametrize("key", [VALID_KEY + "\u00fc", "\u00e9" + VALID_KEY, VALID_KEY + "\x07"])
def test_an_api_key_that_an_http_header_cannot_carry_is_refused_at_start_up(tmp_path, key):
    path = tmp_path / "keys"
    path.write_text(f"# keys\nward {key}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=":2: key holds a character that is not printable ASCII") as caught:
        ApiKeys.from_file(path)
    assert key not in str(caught.value)


def test_readiness_is_503_while_the_audit_log_s_disk_is_nearly_full_yet_answers_go_on(tmp_path, caplog):
    """The free space is read for real (statvfs): a minimum above what the disk has makes it "nearly full"."""
    import shutil

    wanted_mb = shutil.disk_usage(tmp_path).free / 2**20 + 1024
    client = TestClient(create_app(settings(tmp_path, audit_min_free_mb=wanted_mb), lambda _: StubEngine()))
    client.__enter__()
    try:
        wait_until(lambda: client.app.state.service.ready)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error_type"] == "AuditError", ready.text
        assert "nearly full" in ready.json()["error"] and str(tmp_path) in ready.json()["error"]
        assert "--audit_min_free_mb" in ready.json()["error"] and int(ready.headers["Retry-After"]) >= 1
        assert post(client).status_code == 200  # rows can still be written: answers are not refused
        assert "nearly full" in caplog.text  # said at start-up too
    finally:
        client.__exit__(None, None, None)
    unchecked = ready_client(create_app(settings(tmp_path, audit_min_free_mb=0), lambda _: StubEngine()))
    unchecked.__exit__(None, None, None)


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs), where the system lets this process mount one; else the test is skipped."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount in this container)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_service_unready_after_the_probe(small_disk):
    """On a full disk an empty probe transaction succeeds; readiness must not come back while rows fail."""
    s = ServeSettings(audit_db=str(small_disk / "audit.sqlite3"), audit_min_free_mb=1)
    client = ready_client(create_app(s, lambda _: StubEngine()))
    try:
        with open(small_disk / "filler", "wb") as filler:  # what else on the disk took its space
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        answers = [post(client) for _ in range(5)]  # some rows may still fit in pages SQLite holds
        assert answers[-1].status_code == 503 and answers[-1].json()["error_type"] == "AuditError"
        for _ in range(3):  # probes run meanwhile, and find the write lock free
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error_type"] == "AuditError", ready.text
            time.sleep(0.2)
        (small_disk / "filler").unlink()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        assert post(client).status_code == 200
    finally:
        client.__exit__(None, None, None)

"""``pneumoscan serve`` as a real server process on a free loopback port.

One server (with an API key file and a 3 MiB upload limit) answers every test in this
module but the last, which kills its own server with SIGKILL in the middle of requests.
Every answer is checked against the audit log right after it arrives: the row is committed
before the response is sent.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicom_files import IDENTIFIERS, dicom_bytes
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServerProcess, audit_row, audit_rows, raw_http
from shipped import SHIPPED_VERSION

from pneumoscan.inference import MedicalImageInference
from pneumoscan.serve.cli import audit_main

KEY_ID, KEY = "tests", "test-key-5f0e9c2a7b614d3e"
LIMIT_MB = 3
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, train_dir):
    folder = tmp_path_factory.mktemp("serve")
    keys = folder / "keys.txt"
    keys.write_text(f"# id key\n{KEY_ID} {KEY}\n")
    keys.chmod(0o600)
    proc = ServerProcess(folder, "--api_key_file", str(keys), "--max_upload_mb", str(LIMIT_MB),
                         "--header_timeout_s", str(HEADER_TIMEOUT_S)).start()
    yield proc
    assert proc.stop(), proc.log()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def xray(fullres_dir) -> Path:
    """A full-size pneumonia film (well under the 3 MiB limit)."""
    return sorted((fullres_dir / "PNEUMONIA").iterdir())[0]


def post(client, path: Path | None = None, data: bytes | None = None, name: str = "x.jpg", **params):
    content = path.read_bytes() if path is not None else data
    return client.post("/v1/predict", params=params, files={"file": (name, content)})


def assert_error(server, response, status: int, error_type: str) -> dict:
    """The error shape, its request id in the header and in the audit log with the same status and type."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type", "request_id"} and body["error"]
    assert body["error_type"] == error_type
    assert body["request_id"] == response.headers["X-Request-ID"]
    if response.request.url.path.startswith("/v1/"):
        row = audit_row(server.audit_db, body["request_id"])
        assert row is not None, "an answered request is missing from the audit log"
        assert (row["status"], row["error_type"], row["error"]) == (status, error_type, body["error"])
    return body


def test_health_and_readiness_need_no_key(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "model_version": None}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready == {"status": "ready", "model_version": SHIPPED_VERSION}
    assert httpx.get(server.url + "/metrics").status_code == 200
    for path in ("/", "/healthz", "/readyz", "/metrics"):  # uptime checks that send HEAD
        head = httpx.head(server.url + path)
        assert head.status_code == 200 and head.content == b"", path


def test_predict_matches_the_engine_and_is_audited(server, client, xray):
    started = time.time()
    response = post(client, xray, name=xray.name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["Cache-Control"] == "no-store"
    expected = MedicalImageInference().predict_image(xray)
    for field in ("prediction", "risk_level", "model_version", "threshold", "calibrated", "warnings"):
        assert body[field] == getattr(expected, field), field
    for field in ("confidence", "uncertainty"):
        assert body[field] == pytest.approx(getattr(expected, field), abs=1e-6)
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    assert body["processing_time"] > 0 and body["timestamp"] and body["heatmap"] is None
    assert body["input_sha256"] == hashlib.sha256(xray.read_bytes()).hexdigest()

    row = audit_row(server.audit_db, body["request_id"])
    assert row["status"] == 200 and row["api_key_id"] == KEY_ID and row["client"] == "127.0.0.1"
    assert (row["prediction"], row["risk_level"]) == (body["prediction"], body["risk_level"])
    assert row["probability"] == pytest.approx(body["probabilities"]["PNEUMONIA"])
    assert json.loads(row["warnings"]) == body["warnings"]  # what the drift check counts low-detail answers from
    assert (row["input_sha256"], row["input_bytes"]) == (body["input_sha256"], xray.stat().st_size)
    assert (row["model_version"], row["threshold"]) == (body["model_version"], body["threshold"])
    assert row["method"] == "POST" and row["path"] == "/v1/predict" and row["latency_ms"] > 0
    assert row["time"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    assert xray.name not in json.dumps(row), "the upload's file name must not be stored"


def test_heatmap_is_a_png_overlay(client, xray):
    body = post(client, xray, heatmap="true").json()
    assert body["heatmap"].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1])))
    original = Image.open(xray)
    assert img.mode == "RGB" and max(img.size) == 512
    assert img.size[0] / img.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)
    rgb = np.asarray(img).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 5, "the overlay should be coloured"


def test_raw_body_upload(client, xray):
    response = client.post("/v1/predict", content=xray.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200 and response.json()["prediction"] in ("NORMAL", "PNEUMONIA")


def _bad_files(folder: Path, real_jpeg: Path) -> dict[str, bytes]:
    yy, xx = np.mgrid[0:300, 0:400]
    colour = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) * 255 // 700], -1).astype(np.uint8)

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    gray = np.asarray(Image.open(real_jpeg).convert("L"))
    jpeg = real_jpeg.read_bytes()
    return {"empty.jpg": b"", "notes.jpg": b"this is a text file, not a radiograph\n",
            "truncated.jpeg": jpeg[: len(jpeg) // 2], "blank.png": png(np.full((300, 300), 128, np.uint8)),
            "photo.png": png(colour), "ct.dcm": dicom_bytes(folder, gray, Modality="CT")}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, real_jpeg) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
    """The bad files, and what ``pneumoscan predict`` says of each: name -> (error_type, reason)."""
    folder = tmp_path_factory.mktemp("bad")
    files = _bad_files(folder, real_jpeg)
    cli = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    outcomes = MedicalImageInference().predict_batch([folder / name for name in files])
    for name, failure in zip(files, outcomes):
        prefix = f"{folder / name}: "
        assert failure.error.startswith(prefix)
        cli[name] = (failure.error_type, failure.error[len(prefix):])
    return files, cli


@pytest.mark.parametrize("name, error_type", [
    ("empty.jpg", "ImageError"), ("notes.jpg", "ImageError"), ("truncated.jpeg", "ImageError"),
    ("blank.png", "OutOfScopeError"), ("photo.png", "OutOfScopeError"), ("ct.dcm", "OutOfScopeError"),
])
def test_refusals_are_422_with_the_cli_reason(server, client, refusals, name, error_type):
    files, cli = refusals
    body = assert_error(server, post(client, data=files[name], name=name), 422, error_type)
    assert (body["error_type"], body["error"]) == cli[name]
    assert name not in body["error"]


@pytest.mark.parametrize("case", ["no body", "other field", "wrong content type", "two files"])
def test_no_file_is_400(server, client, xray, case):
    if case == "no body":
        response = client.post("/v1/predict")
    elif case == "other field":
        response = client.post("/v1/predict", files={"image": ("x.jpg", xray.read_bytes())})
    elif case == "wrong content type":
        response = client.post("/v1/predict", content=b"{}", headers={"Content-Type": "application/json"})
    else:
        response = client.post("/v1/predict", files=[("file", ("a.jpg", b"a")), ("file", ("b.jpg", b"b"))])
    assert_error(server, response, 400, "NoFile")


def test_bad_query_is_400(server, client, xray):
    body = assert_error(server, post(client, xray, heatmap="maybe"), 400, "BadRequest")
    assert body["error"] == "query parameter heatmap is not true or false: use heatmap=true or heatmap=false"
    body = assert_error(server, post(client, xray, heatmaps="true"), 400, "BadRequest")
    assert body["error"].startswith("unknown query parameter 'heatmaps' for POST /v1/predict; it takes heatmap")


@pytest.mark.parametrize("method, path, call", [
    ("GET", "/v1/predict", "use POST /v1/predict with the film as multipart field 'file'"),
    ("PUT", "/v1/predict", "use POST /v1/predict with the film as multipart field 'file'"),
    ("POST", "/v1/model", "use GET /v1/model"),
])
def test_wrong_method_is_405(server, client, method, path, call):
    response = client.request(method, path)
    body = assert_error(server, response, 405, "MethodNotAllowed")
    assert response.headers["Allow"]
    assert body["error"].startswith(f"{path} does not take {method}: {call}") and "/docs" in body["error"]


def test_unknown_path_is_404(server, client):
    for path in ("/v1/nothing-here", "/nothing-here"):
        body = assert_error(server, client.get(path), 404, "NotFound")
        assert "POST /v1/predict with the film as multipart field 'file'" in body["error"]
        assert "GET /v1/model" in body["error"] and "/docs" in body["error"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-0000000000000", f"Basic {KEY}", "Bearer"])
@pytest.mark.parametrize("method, path", [("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/v1/nothing")])
def test_v1_needs_the_api_key(server, authorization, method, path):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, server.url + path, headers=headers, files={"file": ("x", b"x")}
                             if method == "POST" else None)
    assert_error(server, response, 401, "Unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert audit_row(server.audit_db, response.json()["request_id"])["api_key_id"] is None


def _multipart_head(port: int, extra: str) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=XyZ\r\n{extra}\r\n").encode()


def test_declared_oversize_upload_is_413_before_the_body(server):
    # Only the headers are sent: the answer must come without the server waiting for 10 MiB.
    head = _multipart_head(server.port, f"Content-Length: {10 * 2**20}\r\n")
    t0 = time.monotonic()
    status, headers, body = raw_http(server.port, head)
    assert time.monotonic() - t0 < 10
    assert status == 413 and json.loads(body)["error_type"] == "UploadTooLarge"
    row = audit_row(server.audit_db, headers["x-request-id"])
    assert row["status"] == 413 and row["input_sha256"] is None


def test_a_file_of_exactly_the_limit_is_taken_and_one_byte_more_is_413(server, client):
    at_limit = b"\xff" * (LIMIT_MB * 2**20)  # not an image: read, then refused as unreadable, not as too large
    assert_error(server, client.post("/v1/predict", files={"file": ("x.jpg", at_limit)}), 422, "ImageError")
    assert_error(server, client.post("/v1/predict", files={"file": ("x.jpg", at_limit + b"\xff")}), 413,
                 "UploadTooLarge")
    raw = client.post("/v1/predict", content=at_limit + b"\xff", headers={"Content-Type": "image/jpeg"})
    assert_error(server, raw, 413, "UploadTooLarge")


def test_streamed_oversize_upload_is_cut_off_with_413(server):
    # Chunked, no length: the server counts while reading and answers once past the limit; the
    # client stops just past it and never sends the end of the body.
    chunk = 256 * 1024
    n = LIMIT_MB * 2**20 // chunk + 1
    preamble = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
    parts = [f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n"]
    parts += [f"{chunk:x}\r\n".encode() + b"\xff" * chunk + b"\r\n" for _ in range(n)]
    status, headers, body = raw_http(server.port, _multipart_head(server.port, "Transfer-Encoding: chunked\r\n"),
                                     parts)
    assert status == 413 and json.loads(body)["error_type"] == "UploadTooLarge"
    assert audit_row(server.audit_db, headers["x-request-id"])["status"] == 413


def test_dicom_upload_keeps_patient_identifiers_out(server, client, tmp_path, real_jpeg):
    from pydicom.uid import JPEG2000Lossless

    gray = np.asarray(Image.open(real_jpeg).convert("L"))
    plain = dicom_bytes(tmp_path, gray, ViewPosition="PA")
    # The file name, as PACS exports often do, carries the patient too.
    name = f"{IDENTIFIERS['PatientName']}_{IDENTIFIERS['PatientID']}.dcm"
    ids = []
    response = post(client, data=plain, name=name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["view_position"] == "PA"
    ids.append(body["request_id"])

    raw = client.post("/v1/predict", content=plain, headers={"Content-Type": "application/dicom"})
    assert raw.status_code == 200 and raw.json()["probabilities"] == body["probabilities"]
    ids.append(raw.json()["request_id"])

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")
    j2k = post(client, tmp_path / "j2k.dcm", name=name, heatmap="true")
    assert j2k.status_code == 200, j2k.text
    assert j2k.json()["probabilities"] == pytest.approx(body["probabilities"], abs=1e-9)
    ids.append(j2k.json()["request_id"])

    refused = post(client, data=dicom_bytes(tmp_path, gray, Modality="MR"), name=name)
    assert_error(server, refused, 422, "OutOfScopeError")
    ids.append(refused.json()["request_id"])

    assert all(audit_row(server.audit_db, i) for i in ids)
    stored = b"".join(p.read_bytes() for p in server.audit_db.parent.glob("audit.sqlite3*"))
    log = server.log()
    for value in IDENTIFIERS.values():
        assert value.encode() not in stored, f"{value} is in the audit database"
        assert value not in log, f"{value} is in the server log"


def test_dicom_text_that_is_no_defined_term_is_not_echoed(server, client, tmp_path, real_jpeg):
    # a site that typed the patient into ViewPosition and BodyPartExamined, and a modality nobody defined
    gray = np.asarray(Image.open(real_jpeg).convert("L"))
    typed = dicom_bytes(tmp_path, gray, ViewPosition="MUELLER HANS", BodyPartExamined="PID12345 KNEE")
    response = post(client, data=typed, name="typed.dcm")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["view_position"] == "unrecognised"
    assert "view position is an unrecognised value, not frontal (PA/AP)" in " ".join(body["warnings"])
    assert "body part examined is an unrecognised value, not CHEST" in body["warnings"]
    refused = post(client, data=dicom_bytes(tmp_path, gray, Modality="MUELLERHANS"), name="typed.dcm")
    assert "modality is an unrecognised value" in assert_error(server, refused, 422, "OutOfScopeError")["error"]
    rows = [audit_row(server.audit_db, r.json()["request_id"]) for r in (response, refused)]
    stored = b"".join(p.read_bytes() for p in server.audit_db.parent.glob("audit.sqlite3*"))
    for text in ("MUELLER", "HANS", "PID12345"):
        assert text not in response.text and text not in refused.text
        assert text not in json.dumps(rows) and text.encode() not in stored, f"{text} is in the audit log"
        assert text not in server.log(), f"{text} is in the server log"


def test_connections_that_never_complete_their_headers_are_closed(server):
    import socket

    def opened(first_bytes: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 8)
        s.sendall(first_bytes)
        return s

    t0 = time.monotonic()
    partial = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()  # never the blank line
    idle = [opened(b"") for _ in range(3)] + [opened(partial) for _ in range(2)]
    kept_alive = opened(partial + b"\r\n")  # one whole request, then half of the next
    answer = b""
    while not answer.endswith(b"}"):  # the whole answer to the first request: {"status":"ok",...}
        answer += kept_alive.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    kept_alive.sendall(partial)
    t_second = time.monotonic()
    assert httpx.get(server.url + "/healthz").status_code == 200  # meanwhile the service answers
    for s in [*idle, kept_alive]:
        with s:
            try:
                assert s.recv(65536) == b"", "a connection without complete headers got an answer"
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail(f"a connection without complete headers is still open after {HEADER_TIMEOUT_S + 8} s")
    assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 6
    # the clock of a kept-alive connection starts with its next request, and does not wait for the 5 s keep-alive
    assert time.monotonic() - t_second < HEADER_TIMEOUT_S + 2.5


def test_concurrent_requests_are_micro_batched(server, client, train_dir):
    files = sorted((train_dir / "PNEUMONIA").iterdir())[:32]

    def batches() -> tuple[float, float]:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
        samples = {s.name: s.value for s in families["pneumoscan_inference_batch_size"].samples}
        return samples["pneumoscan_inference_batch_size_count"], samples["pneumoscan_inference_batch_size_sum"]

    count0, images0 = batches()
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda f: post(client, f), files))
    # The gate refuses about 0.5 % of real radiographs (one of these 32): 422 OutOfScopeError.
    statuses = {r.json()["request_id"]: r.status_code for r in responses}
    assert sum(s == 200 for s in statuses.values()) >= 28
    assert all(r.status_code == 200 or r.json()["error_type"] == "OutOfScopeError" for r in responses)
    assert len(statuses) == len(files)
    count, images = batches()
    assert images - images0 == len(files)
    assert count - count0 < len(files), "16 concurrent clients never shared a forward pass"
    rows = audit_rows(server.audit_db, f"WHERE request_id IN ({','.join('?' * len(statuses))})",
                      tuple(statuses))
    assert {r["request_id"]: r["status"] for r in rows} == statuses


def test_a_model_that_cannot_answer_is_a_500_worth_retrying_not_a_422_about_the_file(tmp_path, nan_model, xray):
    proc = ServerProcess(tmp_path, "--model_path", str(nan_model)).start()
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            body = assert_error(proc, post(c, xray), 500, "InternalError")
        assert "not a fault of the file" in body["error"] and "send it again" in body["error"]
        assert "not finite" in proc.log()  # the detail is in the server log, under the request id
    finally:
        assert proc.stop(), proc.log()[-2000:]


def test_metrics(server, client, xray):
    def values() -> dict:
        text = httpx.get(server.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    before = values()
    ok = post(client, xray).json()
    assert_error(server, post(client, data=b"not an image"), 422, "ImageError")
    assert httpx.get(server.url + "/no-such-page").status_code == 404  # not a /v1 refusal
    after = values()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("pneumoscan_http_requests_total", method="POST", path="/v1/predict", status="200") == 1
    assert delta("pneumoscan_http_requests_total", method="POST", path="/v1/predict", status="422") == 1
    assert delta("pneumoscan_predictions_total", prediction=ok["prediction"], risk_level=ok["risk_level"]) == 1
    assert delta("pneumoscan_refusals_total", reason="ImageError") == 1
    assert delta("pneumoscan_refusals_total", reason="NotFound") == 0
    assert delta("pneumoscan_http_request_duration_seconds_count", path="/v1/predict") == 2
    assert after[("pneumoscan_model_info", (("model_version", SHIPPED_VERSION),))] == 1


def test_model_endpoint(client):
    from pneumoscan.checkpoint import default_model_path, load_checkpoint

    ckpt = load_checkpoint(default_model_path())
    info = client.get("/v1/model").json()
    assert info["model_version"] == ckpt["model_version"] and info["threshold"] == ckpt["threshold"]
    assert info["temperature"] == ckpt["temperature"] and info["calibrated"] and info["out_of_scope_gate"]
    assert info["validation_metrics"]["auroc"] == ckpt["metrics"]["val_auroc"]
    assert info["validation_metrics"]["sensitivity"] == ckpt["metrics"]["val_sensitivity"]
    assert "children aged 1-5" in info["intended_use"] and "Not a diagnostic device" in info["notice"]
    assert info["max_upload_mb"] == LIMIT_MB and info["backend"] in ("torch", "onnx", "onnx-int8")
    assert info["intensity"] == ckpt["input_spec"].get("intensity", "raw") == "raw"


def test_page_and_docs(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "Not a diagnostic device" in page.text
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{server.url}/static/{name}")
        assert asset.status_code == 200 and len(asset.text) > 500
        assert "http://" not in asset.text and "https://" not in asset.text, f"{name} must not load from elsewhere"
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page.text), "the page must not load from elsewhere"
    spec = httpx.get(server.url + "/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Prediction")
    assert {"401", "413", "422", "503"} <= set(predict["responses"])
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs.text)
    assert assets and all(a.startswith("/static/swagger/") or a == "/openapi.json" for a in assets), assets
    for asset in assets:  # served by the app itself: /docs works without internet
        assert httpx.get(server.url + asset).status_code == 200, asset


def test_audit_export(server, client, xray, tmp_path, capsys):
    request_id = post(client, xray).json()["request_id"]
    out = tmp_path / "audit.jsonl"
    assert audit_main(["--audit_db", str(server.audit_db), "--format", "jsonl", "--output_path", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert request_id in {r["request_id"] for r in rows}
    assert len(rows) == len(audit_rows(server.audit_db))
    assert KEY not in out.read_text()

    assert audit_main(["--audit_db", str(server.audit_db), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split(",")[:3] == ["id", "request_id", "time"]
    assert audit_main(["--audit_db", str(server.audit_db), "--format", "csv",
                       "--since", rows[-1]["time"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[-1].split(",")[1] == rows[-1]["request_id"]


def test_kill_9_during_requests_then_restart(tmp_path, train_dir):
    server = ServerProcess(tmp_path / "killed").start()
    files = sorted((train_dir / "NORMAL").iterdir())[:40]
    answered: list[tuple[int, str]] = []
    stop = threading.Event()

    def client_loop(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = offset
            while not stop.is_set():
                try:
                    r = c.post("/v1/predict", files={"file": ("x.jpeg", files[i % len(files)].read_bytes())})
                except httpx.TransportError:
                    return  # the server died under this request
                answered.append((r.status_code, r.headers["X-Request-ID"]))
                i += 4

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(1 for s, _ in answered if s == 200) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    ok = {rid for status, rid in answered if status == 200}
    assert len(ok) >= 8

    conn = sqlite3.connect(server.audit_db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        logged = {r[0] for r in conn.execute("SELECT request_id FROM requests WHERE status = 200")}
    finally:
        conn.close()
    assert ok <= logged, f"{len(ok - logged)} answered request(s) missing from the audit log"

    # The restart also holds at most one request at a time: more at once are refused with 503, never left hanging.
    server.args = ["--max_queue", "1"]
    server.start()
    try:
        r = httpx.post(server.url + "/v1/predict", files={"file": ("x.jpeg", files[0].read_bytes())}, timeout=30)
        assert r.status_code == 200
        assert audit_row(server.audit_db, r.json()["request_id"])["status"] == 200

        def one(f: Path) -> httpx.Response:
            return httpx.post(server.url + "/v1/predict", files={"file": ("x.jpeg", f.read_bytes())}, timeout=30)

        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(one, files[:8]))
        busy = [b for b in burst if b.status_code == 503]
        assert busy and all(b.status_code in (200, 422, 503) for b in burst)
        for b in busy:
            assert b.json()["error_type"] == "Overloaded" and int(b.headers["Retry-After"]) >= 1
            assert audit_row(server.audit_db, b.json()["request_id"])["status"] == 503
    finally:
        assert server.stop()
    conn = sqlite3.connect(server.audit_db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert ok <= {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    finally:
        conn.close()


def test_stalled_and_abandoned_uploads_free_their_place_and_a_busy_port_is_exit_2(tmp_path, xray):
    import socket
    import subprocess
    import sys

    server = ServerProcess(tmp_path / "stall", "--request_timeout_s", "2", "--max_queue", "1").start()
    try:
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: 100000\r\n\r\n").encode()
        # a client that sends 10 of 100,000 bytes and then nothing: answered 408 and its place freed
        t0 = time.monotonic()
        status, headers, body = raw_http(server.port, head, [b"\xff" * 10])
        assert status == 408 and json.loads(body)["error_type"] == "UploadTimeout"
        assert time.monotonic() - t0 < 15
        assert audit_row(server.audit_db, headers["x-request-id"])["error_type"] == "UploadTimeout"
        ok = httpx.post(server.url + "/v1/predict", files={"file": ("x.jpeg", xray.read_bytes())}, timeout=30)
        assert ok.status_code == 200  # the one place in the queue is free again
        # a client that leaves half-way: a 400 in the log, not a 500 "bug"
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + b"\xff" * 50000)
        deadline, left = time.monotonic() + 15, "WHERE error_type = 'ClientDisconnected'"
        while not audit_rows(server.audit_db, left) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = audit_rows(server.audit_db, left)
        assert rows and rows[0]["status"] == 400
        assert not audit_rows(server.audit_db, "WHERE status = 500")
        # a second service on the same port: exit status 2 (bad input), as documented, not uvicorn's 3
        second = subprocess.run([sys.executable, "-m", "pneumoscan", "serve", "--port", str(server.port),
                                 "--audit_db", str(tmp_path / "second.sqlite3")], capture_output=True, text=True,
                                timeout=180)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "address already in use" in second.stderr.lower()
    finally:
        assert server.stop(), server.log()[-2000:]

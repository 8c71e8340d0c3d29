"""``pneumoscan audit --summary``: predictions per period and drift flags, from a real audit log."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from pneumoscan.serve import audit
from pneumoscan.serve.audit import AuditLog, AuditRecord
from pneumoscan.serve.cli import audit_main
from pneumoscan.serve.drift import period_of, summarise

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DAY0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)  # a Monday
OTHER_BODY = "out of scope: looks like a radiograph of another body part"


def _rows(day: int, answered: int, pneumonia: int, refused: int, version: str = "pneumoscan-v2.0",
          failed: int = 0) -> list[AuditRecord]:
    t = DAY0 + timedelta(days=day)
    out = []
    for i in range(answered + refused + failed):
        common = dict(request_id=f"d{day}-{i}", time=(t + timedelta(seconds=i)).isoformat(timespec="microseconds"),
                      method="POST", path="/v1/predict", model_version=version, threshold=0.5377, latency_ms=40.0)
        if i < answered:
            positive = i < pneumonia
            out.append(AuditRecord(status=200, prediction="PNEUMONIA" if positive else "NORMAL",
                                   probability=0.9 if positive else 0.1, risk_level="LOW", **common))
        elif i < answered + refused:
            out.append(AuditRecord(status=422, error_type="OutOfScopeError", error=OTHER_BODY, **common))
        else:
            out.append(AuditRecord(status=503, error_type="Overloaded", error="busy", **common))
    return out


@pytest.fixture
def log_db(tmp_path) -> Path:
    """Day 0 (baseline) and 1 alike; day 2: calls and refusals jump; day 3: another model; day 4: too few."""
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    rows = (_rows(0, 100, 30, 3, failed=2) + _rows(1, 100, 33, 2) + _rows(2, 100, 70, 25)
            + _rows(3, 100, 31, 3, version="pneumoscan-v2.0+site") + _rows(4, 10, 9, 5))
    rows.append(AuditRecord("m1", rows[0].time, "GET", "/v1/model", status=200, latency_ms=1.0))
    for r in rows:
        log.submit(r)
    log.close()
    return path


def test_periods_and_flags_by_hand(log_db):
    s = summarise(audit.iter_records(log_db), "day")
    assert list(s["periods"]) == [f"2026-11-0{d}" for d in range(2, 7)]
    day0, day1, day2, day3, day4 = s["periods"].values()
    assert (day0["requests"], day0["answered"], day0["refused"], day0["not_processed"]) == (105, 100, 3, 2)
    assert day0["refusal_rate"] == 3 / 103 and day0["pneumonia_call_rate"] == 0.30
    assert day0["refused_by_reason"] == {"other_body": 3} and day0["risk_levels"] == {"LOW": 100}
    assert abs(day0["mean_probability"] - (30 * 0.9 + 70 * 0.1) / 100) < 1e-12
    assert s["baseline"]["rule"] == "the first day (2026-11-02)"
    assert day0["flags"] == [] and day1["flags"] == []  # 33 % against 30 %: not drift
    assert len(day2["flags"]) == 2 and "refusal rate 20.0% against 2.9%" in day2["flags"][0]
    assert "PNEUMONIA-call rate 70.0% against 30.0%" in day2["flags"][1]
    assert day3["flags"] == ["model pneumoscan-v2.0+site (baseline pneumoscan-v2.0): not comparable with the "
                             "baseline"]
    assert day4["flags"] == []  # 10 answered: too few to test
    assert s["flagged_periods"] == ["2026-11-04", "2026-11-05"]
    weeks = summarise(audit.iter_records(log_db), "week")
    assert list(weeks["periods"]) == ["2026-W45"] and weeks["periods"]["2026-W45"]["answered"] == 410
    assert period_of("2026-12-31T23:59:59+00:00", "month") == "2026-12"


def test_summary_cli_prints_drift_lines_writes_json_and_can_fail(log_db, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert audit_main(["--audit_db", str(log_db), "--summary", "--output_path", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DRIFT 2026-11-04: refusal rate 20.0% against 2.9%" in text and "pneumoscan calibrate" in text
    assert json.loads(out.read_text())["flagged_periods"] == ["2026-11-04", "2026-11-05"]
    assert audit_main(["--audit_db", str(log_db), "--summary", "--fail_on_drift"]) == 1
    # a baseline of the first two days; from day 3 on only
    assert audit_main(["--audit_db", str(log_db), "--summary", "--baseline_until", "2026-11-04T00:00:00+00:00",
                       "--since", "2026-11-05T00:00:00+00:00", "--output_path", str(out)]) == 0
    s = json.loads(out.read_text())
    # periods from --since on, against a baseline of the earlier days 0 and 1 (200 answered)
    assert list(s["periods"]) == ["2026-11-05", "2026-11-06"] and s["baseline"]["answered"] == 200
    assert s["flagged_periods"] == ["2026-11-05"] and "model" in s["periods"]["2026-11-05"]["flags"][0]


@pytest.mark.parametrize("argv, message", [
    (["--baseline_until", "last week"], "--baseline_until 'last week' is not an ISO 8601 date or time"),
    (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601"),
])
def test_summary_cli_errors_say_what_to_give(log_db, capsys, argv, message):
    assert audit_main(["--audit_db", str(log_db), "--summary", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dev_shift").is_dir(), reason=f"real films not found at {DATA}")
def test_summary_of_a_real_service_counts_what_it_answered_and_refused(tmp_path, train_dir):
    from serve_process import ServerProcess

    films = sorted((train_dir / "NORMAL").iterdir())[:3] + sorted((train_dir / "PNEUMONIA").iterdir())[:3]
    knee = sorted((DATA / "dev_shift" / "other_radiographs").glob("other_radiographs_kneeoa_*"))[0]
    proc = ServerProcess(tmp_path / "serve", "--backend", "torch").start()
    try:
        answers = [httpx.post(proc.url + "/v1/predict", files={"file": (p.name, p.read_bytes())}, timeout=60)
                   for p in [*films, knee]]
        empty = httpx.post(proc.url + "/v1/predict", files={"file": ("e.jpg", b"")}, timeout=60)
    finally:
        assert proc.stop(), proc.log()[-2000:]
    assert [a.status_code for a in answers] == [200] * 6 + [422] and empty.status_code in (400, 422)
    calls = sum(a.json()["prediction"] == "PNEUMONIA" for a in answers[:6])
    s = summarise(audit.iter_records(proc.audit_db), "day")
    (day,) = s["periods"].values()
    assert (day["requests"], day["answered"], day["refused"], day["not_processed"]) == (8, 6, 1, 1)
    assert day["pneumonia_calls"] == calls and day["refused_by_reason"] == {"other_body": 1}
    assert day["model_versions"] == [answers[0].json()["model_version"]]

"""``pneumoscan audit --summary``: predictions per period and drift flags, from a real audit log."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from pneumoscan.cli import EXIT_BAD_INPUT
from pneumoscan.serve import audit
from pneumoscan.serve.audit import AuditLog, AuditRecord
from pneumoscan.serve.cli import EXIT_DRIFT, audit_main
from pneumoscan.serve.drift import _flags, period_of, summarise, two_proportion_z

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DAY0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)  # a Monday
OTHER_BODY = "out of scope: looks like a radiograph of another body part"


def _rows(day: int, answered: int, pneumonia: int, refused: int, version: str = "pneumoscan-v2.0",
          overloaded: int = 0, unreadable: int = 0, threshold: float = 0.5377, same_file: bool = False
          ) -> list[AuditRecord]:
    t = DAY0 + timedelta(days=day)
    out = []
    for i in range(answered + refused + overloaded + unreadable):
        common = dict(request_id=f"d{day}-{i}", time=(t + timedelta(seconds=i)).isoformat(timespec="microseconds"),
                      method="POST", path="/v1/predict", model_version=version, threshold=threshold, latency_ms=40.0,
                      input_sha256="same" if same_file else f"{day}-{i}")
        if i < answered:
            positive = i < pneumonia
            out.append(AuditRecord(status=200, prediction="PNEUMONIA" if positive else "NORMAL",
                                   probability=0.9 if positive else 0.1, risk_level="LOW", **common))
        elif i < answered + refused:
            out.append(AuditRecord(status=422, error_type="OutOfScopeError", error=OTHER_BODY, **common))
        elif i < answered + refused + overloaded:
            out.append(AuditRecord(status=503, error_type="Overloaded", error="busy", **common))
        else:
            out.append(AuditRecord(status=422, error_type="ImageError", error="file is empty", **common))
    return out


@pytest.fixture
def log_db(tmp_path) -> Path:
    """Day 0 (baseline) and 1 alike; day 2: calls and refusals jump; day 3: another model; day 4: too few;
    day 5: unreadable uploads; day 6: one file sent 40 times; day 7: another threshold."""
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    rows = (_rows(0, 100, 30, 3, overloaded=2) + _rows(1, 100, 33, 2) + _rows(2, 100, 70, 25)
            + _rows(3, 100, 31, 3, version="pneumoscan-v2.0+site") + _rows(4, 10, 9, 5)
            + _rows(5, 100, 30, 3, unreadable=20) + _rows(6, 40, 40, 0, same_file=True)
            + _rows(7, 100, 30, 3, threshold=0.61))
    rows.append(AuditRecord("m1", rows[0].time, "GET", "/v1/model", status=200, latency_ms=1.0))
    for r in rows:
        log.submit(r)
    log.close()
    return path


def test_periods_and_flags_by_hand(log_db):
    s = summarise(audit.iter_records(log_db), "day")
    assert list(s["periods"]) == [f"2026-11-{d:02d}" for d in range(2, 10)]
    day0, day1, day2, day3, day4, day5, day6, day7 = s["periods"].values()
    assert (day0["requests"], day0["answered"], day0["refused"], day0["not_processed"]) == (105, 100, 3, 2)
    assert day0["refusal_rate"] == 3 / 103 and day0["pneumonia_call_rate"] == 0.30 and day0["unreadable"] == 0
    assert day0["refused_by_reason"] == {"other_body": 3} and day0["risk_levels"] == {"LOW": 100}
    assert abs(day0["mean_probability"] - (30 * 0.9 + 70 * 0.1) / 100) < 1e-12
    assert s["baseline"]["rule"] == "the first whole day (2026-11-02)" and day0["untested"] == "the baseline"
    assert day1["untested"] is None and day1["flags"] == []  # 33 % against 30 %: not drift
    assert len(day2["flags"]) == 2 and "refusal rate 20.0% against 2.9%" in day2["flags"][0]
    assert "PNEUMONIA-call rate 70.0% against 30.0%" in day2["flags"][1]
    assert day3["flags"] == ["model pneumoscan-v2.0+site (baseline pneumoscan-v2.0): not comparable with the "
                             "baseline; set a new one (--baseline_until)"]
    assert day4["flags"] == []  # 10 answered: too few to test
    assert day5["unreadable"] == 20 and len(day5["flags"]) == 1 and "unreadable rate 16.3% against 0.0%" in day5[
        "flags"][0]
    assert (day6["requests"], day6["repeated_uploads"], day6["answered"]) == (40, 39, 1) and day6["flags"] == []
    assert day7["flags"][0].startswith("threshold changed")
    assert s["flagged_periods"] == ["2026-11-04", "2026-11-05", "2026-11-07", "2026-11-09"]
    weeks = summarise(audit.iter_records(log_db), "week")
    assert list(weeks["periods"]) == ["2026-W45", "2026-W46"] and weeks["periods"]["2026-W45"]["answered"] == 511
    assert period_of("2027-01-01T10:00:00.000000+00:00", "week") == "2026-W53"
    assert period_of("2026-12-31T23:59:59.999999+00:00", "month") == "2026-12"


def test_a_film_answered_on_a_retry_after_a_503_counts_as_answered(tmp_path):
    # the page retries a 503; the first try's row already carries the film's hash (set before predicting)
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    busy = [AuditRecord(**{**vars(r), "status": 503, "prediction": None, "probability": None, "risk_level": None,
                           "error_type": "Overloaded", "error": "busy", "request_id": r.request_id + "-busy"})
            for r in _rows(0, 6, 2, 0)]
    for r in busy + _rows(0, 6, 2, 0):
        log.submit(r)
    log.close()
    day = summarise(audit.iter_records(path), "day")["periods"]["2026-11-02"]
    assert (day["requests"], day["repeated_uploads"], day["answered"], day["not_processed"]) == (12, 6, 6, 0)
    assert day["pneumonia_calls"] == 2


def test_untested_periods_say_why(log_db):
    rows = list(audit.iter_records(log_db))
    # a period not over yet is shown, not tested
    s = summarise(rows, "day", now=DAY0 + timedelta(days=2, hours=6))
    assert s["periods"]["2026-11-04"]["untested"] == "not over yet" and s["periods"]["2026-11-04"]["flags"] == []
    # a week that straddles --baseline_until (a Thursday) is part baseline: not tested
    s = summarise(rows, "week", baseline_until="2026-11-05T00:00:00.000000+00:00")
    assert s["periods"]["2026-W45"]["untested"] == "overlaps the baseline" and s["baseline"]["answered"] == 300
    assert s["periods"]["2026-W46"]["untested"] is None
    # --since cutting a week
    s = summarise(rows, "week", since="2026-11-04T00:00:00.000000+00:00")
    assert s["periods"]["2026-W45"]["untested"] == "cut by --since"
    # a baseline with too few requests tests nothing
    s = summarise(rows, "day", baseline_until="2026-01-01T00:00:00.000000+00:00")
    assert not s["baseline_usable"] and s["flagged_periods"] == []
    assert s["periods"]["2026-11-04"]["untested"].startswith("baseline too small (0 answered")


def test_the_test_needs_counts_and_an_effect():
    assert two_proportion_z(3, 30, 0, 100) is None  # expected refusals below 5: no normal approximation
    assert two_proportion_z(10, 29, 5, 100) is None  # too few requests
    z = two_proportion_z(6300, 20000, 6000, 20000)  # 31.5 % against 30 %: "significant", clinically nothing
    assert z is not None and z > 3
    base = {"answered": 20000, "refused": 0, "unreadable": 0, "pneumonia_calls": 6000, "model_versions": [],
            "thresholds": [], "low_detail": 0, "warnings_recorded": 0}
    assert _flags({**base, "pneumonia_calls": 6300}, base) == []  # under the 5-point effect
    assert len(_flags({**base, "pneumonia_calls": 7100}, base)) == 1


def test_a_change_of_exactly_five_points_is_flagged():
    # 15 % against 10 %: in floats 0.15 - 0.10 < 0.05, so a float comparison missed it
    base = {"answered": 2000, "refused": 0, "unreadable": 0, "pneumonia_calls": 200, "model_versions": [],
            "thresholds": [], "low_detail": 0, "warnings_recorded": 0}
    assert [f.split(" 1")[0] for f in _flags({**base, "pneumonia_calls": 300}, base)] == ["PNEUMONIA-call rate"]
    assert _flags({**base, "pneumonia_calls": 299}, base) == []  # 14.95 %: under the effect


def test_a_site_that_starts_sending_downscaled_copies_is_flagged(tmp_path):
    """The share of answers with a low-detail warning is a drift rate too, counted over the answers whose
    warnings the log holds: a baseline logged before that column existed tests nothing."""
    from pneumoscan.inference import LOW_DETAIL

    warned = json.dumps([LOW_DETAIL.format("much less fine detail than the training films (...)")])

    def day(d: int, low: int, recorded: bool = True) -> list[AuditRecord]:
        rows = _rows(d, 100, 30, 0)
        for i, r in enumerate(rows):
            r.warnings = (warned if i < low else "[]") if recorded else None
        return rows

    def summary(rows) -> dict:
        path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.sqlite3"
        log = AuditLog(path)
        for r in rows:
            log.submit(r)
        log.close()
        return summarise(audit.iter_records(path), "day")

    s = summary(day(0, 1) + day(1, 2) + day(2, 25))
    d0, d1, d2 = s["periods"].values()
    assert (d0["low_detail"], d0["warnings_recorded"], d0["low_detail_rate"]) == (1, 100, 0.01)
    assert d1["flags"] == [] and len(d2["flags"]) == 1
    assert d2["flags"][0].startswith("low-detail rate 25.0% against 1.0% in the baseline")
    old = summary(day(0, 0, recorded=False) + day(1, 25))  # a baseline from before the column
    assert old["baseline"]["warnings_recorded"] == 0 and old["flagged_periods"] == []
    broken = day(0, 0)
    broken[0].warnings = "not json"  # a hand-edited row: not counted, and the summary still comes out
    assert summary(broken)["baseline"]["warnings_recorded"] == 99


def test_summary_cli_prints_drift_lines_writes_json_and_can_fail(log_db, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert audit_main(["--audit_db", str(log_db), "--summary", "--output_path", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DRIFT 2026-11-04: refusal rate 20.0% against 2.9%" in text and "pneumoscan calibrate" in text
    assert json.loads(out.read_text())["flagged_periods"] == ["2026-11-04", "2026-11-05", "2026-11-07", "2026-11-09"]
    assert audit_main(["--audit_db", str(log_db), "--summary", "--fail_on_drift"]) == EXIT_DRIFT
    # dates without an offset are UTC days here; the baseline is read from before --since
    assert audit_main(["--audit_db", str(log_db), "--summary", "--baseline_until", "2026-11-04",
                       "--since", "2026-11-04", "--output_path", str(out)]) == 0
    s = json.loads(out.read_text())
    assert list(s["periods"])[0] == "2026-11-04" and s["periods"]["2026-11-04"]["untested"] is None
    assert s["baseline"]["answered"] == 200 and s["baseline_until"] == "2026-11-04T00:00:00.000000+00:00"
    # a baseline before the first request: a scheduled check must not pass for ever
    assert audit_main(["--audit_db", str(log_db), "--summary", "--baseline_until", "2026-01-01",
                       "--fail_on_drift"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nothing was tested; choose a --baseline_until after enough requests" in err


def test_fail_on_drift_passes_when_nothing_moved(tmp_path):
    path = tmp_path / "calm.sqlite3"
    log = AuditLog(path)
    for r in _rows(0, 100, 30, 3) + _rows(1, 100, 32, 2) + _rows(2, 100, 28, 4):
        log.submit(r)
    log.close()
    assert audit_main(["--audit_db", str(path), "--summary", "--fail_on_drift"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--baseline_until", "last week"], "--baseline_until 'last week' is not an ISO 8601 date or time"),
    (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601"),
])
def test_summary_cli_errors_say_what_to_give(log_db, capsys, argv, message):
    assert audit_main(["--audit_db", str(log_db), "--summary", *argv]) == EXIT_BAD_INPUT
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
    assert (day["requests"], day["answered"], day["refused"]) == (8, 6, 1)
    # an empty upload is unreadable (422) or no file at all (400)
    assert (day["unreadable"], day["not_processed"]) == ((1, 0) if empty.status_code == 422 else (0, 1))
    assert day["pneumonia_calls"] == calls and day["refused_by_reason"] == {"other_body": 1}
    assert day["model_versions"] == [answers[0].json()["model_version"]]

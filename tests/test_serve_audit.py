"""The audit log on its own: schema versions and migration, group commit, export and its CLI."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from pneumoscan.serve import audit
from pneumoscan.serve.audit import MIGRATIONS, AuditError, AuditLog, AuditRecord, connect, export
from pneumoscan.serve.cli import audit_main


def record(i: int, time: str | None = None, **fields) -> AuditRecord:
    return AuditRecord(request_id=f"r{i:04d}", time=time or audit.utc_now(), method="POST", path="/v1/predict",
                       status=200, latency_ms=12.5, **fields)


def test_new_database_is_wal_at_the_current_version(tmp_path):
    conn = connect(tmp_path / "a.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == audit.SCHEMA_VERSION == len(MIGRATIONS)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        assert columns == ["id", *audit.COLUMNS]
    finally:
        conn.close()


def test_a_version_1_log_gains_the_warnings_column_and_keeps_its_rows(tmp_path):
    """A log written before the warnings column (schema version 1) opens at the current version; its rows keep
    NULL warnings, which the drift check reads as "not logged", not as "no warning"."""
    path = tmp_path / "v1.db"
    conn = connect(path, MIGRATIONS[:1])
    conn.execute("INSERT INTO requests (request_id, time, method, path, status, latency_ms) VALUES "
                 "('old', '2026-11-01T00:00:00.000000+00:00', 'POST', '/v1/predict', 200, 1.0)")
    conn.commit()
    conn.close()
    log = AuditLog(path)
    log.submit(record(2, prediction="NORMAL", warnings="[]")).result(10)
    log.close()
    rows = {r["request_id"]: r for r in audit.iter_records(path)}
    assert rows["old"]["warnings"] is None and rows["r0002"]["warnings"] == "[]"


def test_a_later_column_migrates_an_existing_log(tmp_path):
    path = tmp_path / "a.db"
    log = AuditLog(path)
    log.submit(record(1, prediction="NORMAL")).result(10)
    log.close()
    later = (*MIGRATIONS, ("ALTER TABLE requests ADD COLUMN uncertainty REAL",))
    conn = connect(path, later)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
        assert conn.execute("SELECT request_id, prediction, uncertainty FROM requests").fetchall() == [
            ("r0001", "NORMAL", None)]
    finally:
        conn.close()
    # this code's schema is now older than the file's: refused for writing, exported as it is
    with pytest.raises(AuditError, match="newer than this pneumoscan"):
        connect(path)
    assert [r["request_id"] for r in audit.iter_records(path)] == ["r0001"]


def test_a_failing_migration_leaves_the_log_as_it_was(tmp_path):
    path = tmp_path / "a.db"
    connect(path).close()
    broken = (*MIGRATIONS, ("ALTER TABLE requests ADD COLUMN x REAL", "ALTER TABLE nowhere ADD COLUMN y REAL"))
    with pytest.raises(AuditError):
        connect(path, broken)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert "x" not in [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    finally:
        conn.close()


def test_not_an_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "a.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AuditError, match="cannot be used"):
        AuditLog(path)


def test_concurrent_submissions_are_all_committed(tmp_path):
    path = tmp_path / "a.db"
    log = AuditLog(path)
    futures = [log.submit(record(i)) for i in range(200)]
    for f in futures:
        f.result(10)
    conn = sqlite3.connect(path)  # a second connection sees every row: they are committed
    try:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 200
    finally:
        conn.close()
        log.close()


def test_duplicate_request_id_fails_only_its_batch(tmp_path):
    log = AuditLog(tmp_path / "a.db")
    try:
        log.submit(record(1)).result(10)
        with pytest.raises(AuditError):
            log.submit(record(1)).result(10)
        log.submit(record(2)).result(10)
    finally:
        log.close()


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "a.db"
    now = datetime.now(timezone.utc)
    log = AuditLog(path)
    for i, days in enumerate((30, 2, 0)):
        t = (now - timedelta(days=days)).isoformat(timespec="microseconds")
        log.submit(record(i, t, prediction="PNEUMONIA", probability=0.9, api_key_id="ward3")).result(10)
    log.submit(AuditRecord("r-err", audit.utc_now(), "POST", "/v1/predict", status=422, error_type="ImageError",
                           error="file is empty (0 bytes)", latency_ms=3.0)).result(10)
    log.close()
    return path, now


def test_export_jsonl_and_since(filled, tmp_path):
    path, now = filled
    out = tmp_path / "x.jsonl"
    assert audit_main(["--audit_db", str(path), "--format", "jsonl", "--output_path", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ["r0000", "r0001", "r0002", "r-err"]
    assert rows[-1]["error"] == "file is empty (0 bytes)" and rows[0]["api_key_id"] == "ward3"
    since = (now - timedelta(days=7)).astimezone()  # local time, with its offset
    assert audit_main(["--audit_db", str(path), "--format", "jsonl", "--output_path", str(out),
                       "--since", since.isoformat()]) == 0
    assert [json.loads(line)["request_id"] for line in out.read_text().splitlines()] == ["r0001", "r0002", "r-err"]


def test_export_csv(filled, capsys):
    path, _ = filled
    assert audit_main(["--audit_db", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ",".join(("id", *audit.COLUMNS))
    assert len(lines) == 5 and "ImageError" in lines[-1]


def test_export_since_date_only(filled, tmp_path):
    path, now = filled
    buf = io.StringIO()
    tomorrow = (now.astimezone() + timedelta(days=1)).date().isoformat()
    assert export(path, buf, "csv", tomorrow) == 0
    assert buf.getvalue().startswith("id,request_id,time")


def test_a_log_locked_by_another_program_says_so_not_that_it_is_no_audit_log(filled, monkeypatch):
    path, _ = filled
    monkeypatch.setattr(audit, "READ_BUSY_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=DELETE")  # out of WAL: an exclusive lock then keeps readers out
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AuditError, match="is locked by another program") as caught:
            list(audit.iter_records(path))
        assert "not a pneumoscan audit log" not in str(caught.value)
    finally:
        holder.close()
    assert len(list(audit.iter_records(path))) == 4  # the lock gone, the same log reads


def test_a_database_without_the_requests_table_is_no_audit_log(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="is not a pneumoscan audit log"):
        list(audit.iter_records(path))


@pytest.mark.parametrize("argv, message", [
    (["--audit_db", "missing.db"], "does not exist"),
    (["--since", "last tuesday"], "not an ISO 8601"),
])
def test_audit_cli_errors(filled, tmp_path, argv, message, capsys, monkeypatch):
    path, _ = filled
    monkeypatch.chdir(tmp_path)
    if "--audit_db" not in argv:
        argv = ["--audit_db", str(path), *argv]
    assert audit_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--fail_on_drift"], ["--by", "week"], ["--baseline_until", "2026-01-01"]])
def test_drift_flags_without_summary_are_refused_not_ignored(filled, argv, capsys):
    # a scheduled `audit --fail_on_drift` without --summary would export the log and exit 0 for ever
    with pytest.raises(SystemExit) as stop:
        audit_main(["--audit_db", str(filled[0]), *argv])
    assert stop.value.code == 2 and "only work with --summary" in capsys.readouterr().err


def test_the_export_format_follows_the_file_name_and_a_summary_takes_no_format(filled, tmp_path, capsys):
    path, _ = filled
    out = tmp_path / "x.jsonl"
    assert audit_main(["--audit_db", str(path), "--output_path", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["request_id"] == "r0000"  # JSON Lines, not CSV
    with pytest.raises(SystemExit) as stop:
        audit_main(["--audit_db", str(path), "--summary", "--format", "csv"])
    assert stop.value.code == 2 and "--format is for the export" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--format", "csv"], ["--summary"]])
def test_an_output_path_that_is_the_audit_log_is_refused_and_the_log_kept(filled, extra, capsys):
    path, _ = filled
    before = path.read_bytes()
    assert audit_main(["--audit_db", str(path), *extra, "--output_path", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("name it .json" if "--summary" in extra else "would destroy it") in err
    assert path.read_bytes() == before
    assert audit_main(["--audit_db", str(path), "--format", "jsonl"]) == 0  # still a readable log


def test_a_summary_into_the_audit_log_named_json_is_refused(tmp_path, filled, capsys):
    path, _ = filled
    log_json = tmp_path / "log.json"
    log_json.write_bytes(path.read_bytes())
    assert audit_main(["--audit_db", str(log_json), "--summary", "--output_path", str(log_json)]) == 2
    assert "would destroy it" in capsys.readouterr().err
    assert log_json.read_bytes() == path.read_bytes()


def test_a_failed_export_leaves_an_earlier_export_as_it_was(filled, tmp_path, capsys):
    path, _ = filled
    out = tmp_path / "march.csv"
    assert audit_main(["--audit_db", str(path), "--output_path", str(out)]) == 0
    earlier = out.read_text()
    assert audit_main(["--audit_db", str(tmp_path / "typo.sqlite3"), "--output_path", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert out.read_text() == earlier and len(earlier.splitlines()) == 5


def test_a_summary_goes_to_a_json_file_only(filled, tmp_path, capsys):
    path, _ = filled
    assert audit_main(["--audit_db", str(path), "--summary", "--output_path", str(tmp_path / "s.csv")]) == 2
    assert "name it .json" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()

"""``pneumoscan serve`` (the web service) and ``pneumoscan audit`` (export of its audit log)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from ..atomic import atomic_path, check_writable, same_file
from ..cli import EXIT_BAD_INPUT, EXIT_OK, configure_logging, user_path
from ..errors import OutputPathError
from .audit import AuditError, export, iter_records, to_utc
from .drift import MIN_REQUESTS, PERIODS, format_summary, summarise
from .settings import BACKENDS, DEFAULT_AUDIT_DB, ServeSettings

EXIT_DRIFT = 3  # audit --summary --fail_on_drift: a period is flagged (1 is a crash or a bad file)

log = logging.getLogger("pneumoscan.serve")


def _serve_parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    p = argparse.ArgumentParser(
        prog="pneumoscan serve",
        description="Serve the model over HTTP: a web page at /, POST /v1/predict, GET /v1/model, /healthz, "
                    "/readyz, /metrics, API docs at /docs; every /v1 request is written to the audit log.")
    p.add_argument("--host", default=d.host, help="address to listen on (default loopback; put a TLS reverse "
                                                  "proxy in front to expose the service)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--model_path", type=user_path, help="checkpoint from pneumoscan train (default: the shipped model)")
    p.add_argument("--audit_db", type=user_path, default=d.audit_db,
                   help=f"SQLite audit log (default ./{DEFAULT_AUDIT_DB})")
    p.add_argument("--audit_min_free_mb", type=float, default=d.audit_min_free_mb,
                   help="/readyz is 503 while the audit log's disk has less free space than this, in MiB "
                        "(0: no check; default %(default)g)")
    p.add_argument("--api_key_file", type=user_path,
                   help="require 'Authorization: Bearer <key>' on /v1 with a key from this file "
                   "(one '<key id> <key>' per line)")
    p.add_argument("--max_upload_mb", type=float, default=d.max_upload_mb,
                   help="refuse request bodies above this size with 413 (default %(default)g)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="inference workers, each with its own copy of the model (default %(default)d; more "
                        "only helps with more cores than torch uses in one)")
    p.add_argument("--max_batch", type=int, default=d.max_batch,
                   help="most queued requests per forward pass (1 turns micro-batching off; default %(default)d)")
    p.add_argument("--batch_wait_ms", type=float, default=d.batch_wait_ms,
                   help="wait this long for uploads in progress to join a batch (default %(default)g)")
    p.add_argument("--max_queue", type=int, default=d.max_queue,
                   help="requests held at once; beyond, 503 with Retry-After (default %(default)d)")
    p.add_argument("--request_timeout_s", type=float, default=d.request_timeout_s,
                   help="408 for an upload not received, 503 for a request not predicted, within this time "
                        "(default %(default)g)")
    p.add_argument("--header_timeout_s", type=float, default=d.header_timeout_s,
                   help="close a connection that has not sent a request's complete headers within this time "
                        "(default %(default)g)")
    p.add_argument("--decode_workers", type=int, default=d.decode_workers,
                   help="threads decoding a batch's images (0: none; default %(default)d)")
    p.add_argument("--heatmap_max_side", type=int, default=d.heatmap_max_side,
                   help="longest side in pixels of the heatmap PNG returned with ?heatmap=true (default %(default)d)")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", choices=BACKENDS,
                   help="what runs the model (default: the engine's, as for pneumoscan predict)")
    p.add_argument("--forwarded_allow_ips", default=d.forwarded_allow_ips,
                   help="proxies trusted for X-Forwarded-For (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """``pneumoscan serve``: runs until interrupted; 0 after a clean stop, 2 if it could not start."""
    import uvicorn

    from .app import create_app
    from .protocol import with_header_timeout

    parser = _serve_parser()
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    try:
        settings = ServeSettings(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(verbose=settings.verbose)
    try:
        app = create_app(settings)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level="debug" if settings.verbose else "info",
                            proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
                            http=with_header_timeout(settings.header_timeout_s),
                            # a backstop above the service's own 503s (max_queue); idle connections are closed
                            # after header_timeout_s, so they hold a place for that long only
                            limit_concurrency=max(256, 4 * settings.max_queue),
                            # long enough for a request in progress to be read, predicted and logged
                            timeout_graceful_shutdown=int(2 * settings.request_timeout_s) + 10)
    server = uvicorn.Server(config)
    service = app.state.service
    service.on_load_failure = lambda: setattr(server, "should_exit", True)
    log.info("pneumoscan serve on http://%s:%d (model loading...)", settings.host, settings.port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # uvicorn's own exit, e.g. the port is in use (it logged why)
        log.error("the service could not start (uvicorn exit status %s); see the error above", exc.code)
        return EXIT_BAD_INPUT
    if not server.started or service.load_error is not None:
        return EXIT_BAD_INPUT
    return EXIT_OK


def _audit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumoscan audit",
                                description="Export the service's audit log (one row per /v1 request), or with "
                                            "--summary count its predictions per period and flag drift.")
    p.add_argument("--audit_db", type=user_path, default=DEFAULT_AUDIT_DB,
                   help="the SQLite file pneumoscan serve wrote (default ./%(default)s)")
    p.add_argument("--since", help="only requests from this ISO 8601 date or time on (no offset: local time; "
                                   "with --summary, UTC)")
    p.add_argument("--format", choices=("csv", "jsonl"),
                   help="the export's format (default: from --output_path's extension, else csv); not with --summary")
    p.add_argument("--output_path", type=user_path,
                   help="write here instead of stdout (with --summary: the summary as JSON)")
    p.add_argument("--summary", action="store_true",
                   help="per period: requests, refusals by reason, unreadable uploads, PNEUMONIA-call rate, mean "
                        "P(PNEUMONIA), risk levels; refusal, unreadable and call rates tested against a baseline, "
                        "flags printed as DRIFT lines")
    p.add_argument("--by", choices=PERIODS, help="--summary period (UTC; default day)")
    p.add_argument("--baseline_until", help="--summary baseline: the requests before this ISO 8601 date or time "
                                            "(with --summary, no offset means UTC); default: the first whole period")
    p.add_argument("--fail_on_drift", action="store_true",
                   help=f"--summary: exit with status {EXIT_DRIFT} when a period is flagged, and {EXIT_BAD_INPUT} when "
                        f"the baseline is too small to test anything (for a scheduled check)")
    return p


def audit_main(argv: list[str] | None = None) -> int:
    """``pneumoscan audit``: the log as CSV or JSON Lines on stdout (or ``--output_path``)."""
    parser = _audit_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if args.summary:
        if args.format:
            parser.error("--format is for the export; with --summary the table goes to stdout and the JSON to "
                         "--output_path")
        args.by = args.by or "day"
        return _summary_main(args)
    given = [flag for flag, value in (("--fail_on_drift", args.fail_on_drift), ("--by", args.by),
                                      ("--baseline_until", args.baseline_until)) if value]
    if given:  # a scheduled drift check that would silently never fire
        parser.error(f"{', '.join(given)} only work with --summary (the drift check); add --summary")
    if args.format is None:
        suffix = Path(args.output_path or "x.csv").suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            parser.error(f"--output_path {args.output_path}: the export is CSV or JSON Lines; name it .csv or .jsonl, "
                         f"or give --format")
        args.format = suffix[1:]
    try:
        if args.output_path:
            _check_not_the_log(args.output_path, args.audit_db)
            with atomic_path(args.output_path) as tmp:  # a failed export leaves an earlier file as it was
                with open(tmp, "w", encoding="utf-8", newline="") as out:
                    count = export(args.audit_db, out, args.format, args.since)
        else:
            count = export(args.audit_db, sys.stdout, args.format, args.since)
    except (AuditError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    log.info("%d request(s) exported%s", count, f" to {args.output_path}" if args.output_path else "")
    return EXIT_OK


def _check_not_the_log(output_path: str, audit_db: str) -> None:
    """Refuse an output path that is the audit log itself or one of SQLite's files beside it (checked first)."""
    for part in ("", "-wal", "-shm", "-journal"):
        if same_file(output_path, f"{audit_db}{part}"):
            raise OutputPathError(f"--output_path {output_path} is the audit log {audit_db}{part}; writing there "
                                  f"would destroy it: give another file name")
    check_writable(output_path)


def _summary_main(args) -> int:
    """``pneumoscan audit --summary``: the table on stdout, the JSON to ``--output_path``."""
    from ..results import write_json

    try:
        # the periods are UTC days, so dates without an offset are UTC here (a local midnight would cut them)
        until = to_utc(args.baseline_until, "--baseline_until", naive_is_utc=True) if args.baseline_until else None
        since = to_utc(args.since, naive_is_utc=True) if args.since else None
        if args.output_path:
            if Path(args.output_path).suffix.lower() != ".json":
                raise ValueError(f"--output_path {args.output_path}: the summary is JSON; name it .json")
            _check_not_the_log(args.output_path, args.audit_db)
        summary = summarise(iter_records(args.audit_db), args.by, until, since)
        summary.update(audit_db=args.audit_db, since=since, baseline_until=until)
        sys.stdout.write(format_summary(summary) + "\n")
        if args.output_path:
            write_json(summary, args.output_path)
            log.info("summary written to %s", args.output_path)
    except (AuditError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    if not summary["periods"]:
        log.warning("no prediction requests in %s%s", args.audit_db, f" since {args.since}" if args.since else "")
    if not summary["baseline_usable"]:
        (log.error if args.fail_on_drift else log.warning)(
            "the baseline (%s) has %d answered requests, fewer than the %d a test needs: nothing was tested; "
            "choose a --baseline_until after enough requests", summary["baseline"]["rule"],
            summary["baseline"]["answered"], MIN_REQUESTS)
        if args.fail_on_drift:
            return EXIT_BAD_INPUT
    return EXIT_DRIFT if args.fail_on_drift and summary["flagged_periods"] else EXIT_OK

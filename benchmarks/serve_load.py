#!/usr/bin/env python
"""Load test of ``pneumoscan serve`` on loopback against full-size JPEGs, beside the batch CLI's throughput.

    python benchmarks/serve_load.py --clients 16 --duration 60

1. ``pneumoscan predict``'s batch throughput on the same images and machine: the engine the
   CLI runs, with the CLI's defaults (batch 16, 2 decode threads), in this process, timed
   after a warm-up; measured before and after the load, as the machine's cores are shared.
2. A server process (``python -m pneumoscan serve`` on a free loopback port, a fresh audit
   log), ``--clients`` concurrent clients posting the images round-robin, each waiting for
   its answer before the next: ``--warmup_s`` seconds not counted, then ``--duration``
   seconds measured (at most ``--max_requests``).
3. Throughput, latency percentiles, status counts, the server's CPU seconds per image beside
   the CLI's (where the cores are shared with other work, wall-clock throughput moves with the
   neighbours' load, CPU per image much less), the server's RSS (idle after the warm-up, idle
   after the load, and the peak sampled each second under load), the mean forward-pass batch
   (from /metrics) and whether every answer is in the audit log.

Only 127.0.0.1 is contacted. ``--max_batch 1`` turns micro-batching off for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _common import SHARED_DATA, emit

from pneumoscan.inference import MedicalImageInference, list_inputs

BOUNDARY = "pneumoscanbench"
IDLE_S = 2.0  # RSS is read with the server idle this long: what it keeps, not the batch in flight


def multipart(data: bytes, name: str) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def batch_throughput(files: list[Path], backend: str | None) -> tuple[float, float, str]:
    """Images per second, CPU seconds per image and backend of the engine ``pneumoscan predict`` runs."""
    engine = MedicalImageInference(batch_size=16, **({} if backend is None else {"backend": backend}))
    engine.predict_batch(files[:16])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    engine.predict_batch(files)
    return (len(files) / (time.perf_counter() - t0), (time.process_time() - c0) / len(files),
            engine.info.get("backend", "torch"))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(port: int, audit_db: Path, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pneumoscan", "serve", "--port", str(port), "--audit_db", str(audit_db), *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready in 120 s")


async def load(url: str, bodies: list[bytes], clients: int, duration: float, max_requests: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    request_ids: list[str] = []
    sent = 0
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        end = time.monotonic() + duration

        async def one_client(k: int) -> None:
            nonlocal sent
            i = k
            while time.monotonic() < end and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", content=bodies[i % len(bodies)], headers=headers)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    request_ids.append(r.headers["X-Request-ID"])
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"wall_s": wall, "requests": len(latencies), "statuses": statuses, "latencies": latencies,
            "request_ids": request_ids}


def batch_mean(url: str) -> float | None:
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith(("pneumoscan_inference_batch_size_sum", "pneumoscan_inference_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    count = values.get("pneumoscan_inference_batch_size_count")
    return values["pneumoscan_inference_batch_size_sum"] / count if count else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", default=str(SHARED_DATA / "fullres_sample"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max_requests", type=int, default=20000, help="stop after this many requests in all")
    p.add_argument("--warmup_s", type=float, default=30.0,
                   help="load before the measured run, not counted: the server's RSS climbs to its working set "
                        "(batches of up to 16 images) in the first 20-30 s of load")
    p.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch (1: no micro-batching)")
    p.add_argument("--backend", help="the engine backend for the server and the batch CLI (default: the engine's)")
    p.add_argument("--no_baseline", action="store_true", help="skip the batch CLI measurement")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    files = list_inputs(args.image_dir)
    bodies = [multipart(f.read_bytes(), f.name) for f in files]
    baseline_before = None if args.no_baseline else batch_throughput(files, args.backend)
    print(f"batch CLI before: {baseline_before}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        audit_db = Path(tmp) / "audit.sqlite3"
        extra = ["--max_batch", str(args.max_batch)] + (["--backend", args.backend] if args.backend else [])
        server = start_server(port, audit_db, Path(tmp) / "serve.log", extra)
        try:
            rss_ready = rss_mb(server.pid)
            server_backend = httpx.get(url + "/v1/model").json().get("backend")
            asyncio.run(load(url, bodies, args.clients, args.warmup_s, args.max_requests))  # not counted
            time.sleep(IDLE_S)
            rss_start = rss_mb(server.pid)
            peak = [rss_start]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(1.0):
                    peak.append(rss_mb(server.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            cpu0 = cpu_s(server.pid)
            result = asyncio.run(load(url, bodies, args.clients, args.duration, args.max_requests))
            server_cpu = cpu_s(server.pid) - cpu0
            sampling.set()
            sampler.join()
            time.sleep(IDLE_S)
            rss_end = rss_mb(server.pid)
            mean_batch = batch_mean(url)
        finally:
            server.terminate()
            server.wait(timeout=60)
        conn = sqlite3.connect(audit_db)
        try:
            logged = {r[0] for r in conn.execute("SELECT request_id FROM requests WHERE status = 200")}
        finally:
            conn.close()
    baseline_after = None if args.no_baseline else batch_throughput(files, args.backend)
    print(f"batch CLI after: {baseline_after}", file=sys.stderr)

    lat = result.pop("latencies")
    ids = result.pop("request_ids")
    ok = result["statuses"].get(200, 0)
    throughput = ok / result["wall_s"]
    baselines = [b for b in (baseline_before, baseline_after) if b is not None]
    baseline = statistics.mean(b[0] for b in baselines) if baselines else None
    baseline_cpu = statistics.mean(b[1] for b in baselines) if baselines else None
    server_cpu_per_image = server_cpu / max(1, result["requests"])
    out = {
        **result, "clients": args.clients, "images": len(files), "max_batch": args.max_batch,
        "server_backend": server_backend, "batch_cli_backend": baselines[0][2] if baselines else None,
        "throughput_img_per_s": throughput, "server_errors_5xx": sum(n for s, n in result["statuses"].items()
                                                                   if s >= 500),
        "latency_p50_s": lat[len(lat) // 2], "latency_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "latency_max_s": lat[-1], "mean_forward_batch": mean_batch,
        "batch_cli_img_per_s_before": baseline_before and baseline_before[0],
        "batch_cli_img_per_s_after": baseline_after and baseline_after[0],
        "throughput_vs_batch_cli": throughput / baseline if baseline else None,
        "server_cpu_s_per_image": server_cpu_per_image, "batch_cli_cpu_s_per_image": baseline_cpu,
        "cpu_per_image_vs_batch_cli": server_cpu_per_image / baseline_cpu if baseline_cpu else None,
        "server_rss_mb_ready": rss_ready, "server_rss_mb_start": rss_start, "server_rss_mb_end": rss_end,
        "server_rss_mb_peak_under_load": max(peak),
        "server_rss_mb_every_10s_under_load": [round(v) for v in peak[::10]],
        "server_rss_growth_mb": rss_end - rss_start, "answers_missing_from_audit_log": len(set(ids) - logged),
    }
    ratio = f", {100 * out['throughput_vs_batch_cli']:.0f} % of the batch CLI" if baseline else ""
    emit(out, f"{throughput:.1f} images/s with {args.clients} clients{ratio}; p50 {1000 * out['latency_p50_s']:.0f} ms,"
              f" p99 {1000 * out['latency_p99_s']:.0f} ms; {server_cpu_per_image:.3f} server CPU s per image; "
              f"{out['server_errors_5xx']} server errors; RSS "
              f"{rss_start:.0f} -> {rss_end:.0f} MB; mean batch {mean_batch or 0:.1f}", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

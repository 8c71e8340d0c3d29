"""A real ``python -m pneumoscan serve`` process on a free loopback port, for the service tests."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 120.0  # import, model load; generous because the test machine's cores are shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``pneumoscan serve --port <free> --audit_db <folder>/audit.sqlite3 <args>``, logging to <folder>/serve.log."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.audit_db = self.folder / "audit.sqlite3"
        self.log_path = self.folder / "serve.log"
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start the server and wait until ``/readyz`` answers 200."""
        self.port = free_port()
        cmd = [sys.executable, "-m", "pneumoscan", "serve", "--port", str(self.port),
               "--audit_db", str(self.audit_db), *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S:g} s:\n{self.log()[-3000:]}")

    def stop(self) -> bool:
        """SIGTERM; True if the server shut down gracefully (its lifespan closed the audit log).

        uvicorn re-raises the signal after a graceful shutdown, so the exit status is -15 either way.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return "stopped; audit log closed" in self.log()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def audit_rows(db: Path, where: str = "", params: tuple = ()) -> list[dict]:
    """Rows of the audit log, read as a second process would (read-only)."""
    conn = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM requests {where} ORDER BY id", params)]
    finally:
        conn.close()


def audit_row(db: Path, request_id: str) -> dict | None:
    rows = audit_rows(db, "WHERE request_id = ?", (request_id,))
    return rows[0] if rows else None


def raw_http(port: int, head: bytes, body_parts: list[bytes] = (), timeout: float = 20.0) -> tuple[int, dict, bytes]:
    """Send ``head`` and then ``body_parts`` on a plain socket and read the answer until the server closes.

    Used where httpx would insist on sending a whole body before reading the answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            if b"\r\n\r\n" in data:
                header, _, body = data.partition(b"\r\n\r\n")
                lengths = [int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")]
                if lengths and len(body) >= lengths[0]:
                    break
    data = b"".join(chunks)
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, body

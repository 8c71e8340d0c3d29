"""uvicorn's h11 HTTP protocol with a header timeout: a connection that does not deliver a request's headers in time
is closed.

uvicorn times out idle keep-alive connections (5 s) but not one that opens and never sends its headers, or
sends them a byte at a time: a few hundred such sockets filled ``limit_concurrency``, after which uvicorn
answered every request, /healthz too, with its own 503. Here the clock starts when the connection opens, and
on a kept-alive connection when the first byte of its next request arrives; once the headers are complete it
stops (the body has its own limit, ``--request_timeout_s``, in the routes).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request headers have not all arrived ``header_timeout_s``
    after it opened (or after the first byte of a later request on it). Built by ``with_header_timeout``."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        self._disarm_once_headers_are_in()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()  # part of a pipelined request is already buffered
        self._disarm_once_headers_are_in()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _disarm_once_headers_are_in(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request headers within %g s (--header_timeout_s)",
                      self.client[0] if self.client else "?", self.header_timeout_s)
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, closing header-less connections after ``seconds``."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})

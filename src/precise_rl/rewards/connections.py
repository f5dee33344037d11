"""The reward server's bounds on connections: how many are open, and how long one may take to send a request.

uvicorn accepts every connection and waits for a request's bytes as long as they keep coming, so a
few hundred clients that send slowly (or not at all) hold file descriptors until there are none
left. :func:`bounded_protocol` makes uvicorn's HTTP/1.1 protocol class (h11) with two bounds:

- at most ``max_connections`` open at once: a connection past the bound closes the oldest one that
  is still sending its request (or idle between requests), so that ``/health`` and requests ready
  to be answered always get in; when every open connection is being answered, the new one is
  closed instead;
- a request (its headers and its body) must arrive within ``receive_timeout`` seconds of the
  connection's start or of the previous answer, else the connection is closed.

Each connection closed for a bound is one log line; the ``/score`` endpoint logs its own, a client
that goes away while its body is read, so that every disconnect is one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

__all__ = ["bounded_protocol", "LOG"]

#: the logger of the server's one-line notices (uvicorn's own error logger, so they show with its lines)
LOG = logging.getLogger("uvicorn.error")


def _peer(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"


def bounded_protocol(max_connections: int, receive_timeout: float) -> type:
    """uvicorn's h11 protocol class with a cap on open connections and a deadline per request received."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._deadline: asyncio.TimerHandle | None = None
            self._waiting_since = time.monotonic()
            if len(self.connections) >= max_connections and not self._evict_one():
                # every open connection is being answered: this one waits for none of them
                super().connection_made(transport)
                LOG.warning(
                    "closed the connection from %s: %d connections are open, the limit (--max-connections)",
                    _peer(self),
                    len(self.connections) - 1,
                )
                self.transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def _receiving(self) -> bool:
            """True while the client owes this connection a request (or the rest of one)."""
            return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()

        def _evict_one(self) -> bool:
            candidates = [c for c in self.connections if isinstance(c, BoundedH11Protocol) and c._receiving()]
            if not candidates:
                return False
            oldest = min(candidates, key=lambda c: c._waiting_since)
            oldest._close(f"{len(self.connections)} connections are open, the limit (--max-connections)")
            return True

        def _arm(self) -> None:
            self._disarm()
            self._waiting_since = time.monotonic()
            self._deadline = self.loop.call_later(receive_timeout, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._receiving():
                self._close(f"its request did not arrive within {receive_timeout:g} s (--receive-timeout)")

        def _close(self, why: str) -> None:
            # While the app reads this request's body it logs the disconnect itself (one line each).
            app_reading = self.cycle is not None and not self.cycle.response_complete
            if not app_reading:
                LOG.warning("closed the connection from %s: %s", _peer(self), why)
            self._disarm()
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in: the time the answer takes is not bounded here

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol

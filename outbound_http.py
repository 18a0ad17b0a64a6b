"""The outbound HTTP transport: httpcore's connections, an O(1) pool, plain asyncio sockets.

`bench/client_cost.py` measured one small Convex POST through httpx's stock transport at
840 / 1,530 / 1,915 µs of CPU with 1 / 16 / 64 calls in flight, and through this one at
535-680 / 435-850 / 445 µs (bench/PROFILE.md, 2026-11-30, third session). Two costs are gone:
httpcore 1.0.9's pool recounts all its connections for each idle one on every request and
answer (quadratic in the pool's size), and AnyIO rebuilds its attribute table and polls the
socket to ask whether an idle connection is still usable. Here the pool is a stack, and a
connection's protocol already knows whether the server spoke or hung up (the loop read it).

What a caller relies on is kept as httpx has it:
- **Never sent against maybe sent.** Only a failure to open the connection (TCP or TLS) is a
  `ConnectError`/`ConnectTimeout`, which the transport retries (`retries=`, httpcore's own
  connection does it) and the Convex client may resend even for a mutation. Anything after the
  first byte was written is a `ReadError`, `WriteError`, a timeout of those, or
  `RemoteProtocolError`.
- httpx's exception classes, mapped from httpcore's through one table (as httpx's
  `_transports/default.py` does).
- TLS with httpx's default context (certifi's roots), hostname checked.

Answers are read whole inside the transport: the gateway's upstreams answer small JSON, and
nothing here streams. `tests/test_outbound_http.py` drives it against real servers.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx

# Reading stops (the loop stops reading the socket) past this many unread bytes, as asyncio's
# StreamReader does at 2 x 64 KiB.
READ_HIGH_WATER = 256 * 1024

# httpcore's exceptions -> httpx's, as httpx's own transport maps them (most specific first).
_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
}
_HTTPCORE_ERRORS = tuple(_HTTPX_ERRORS)


class _Socket(asyncio.Protocol):
    """One connection's incoming bytes and state, filled by the event loop as they arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False  # the server closed its side, or the connection is gone
        self.lost: Exception | None = None
        self.writable = True
        self._waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but they are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended, self.lost, self.writable = True, exc, True
        self._wake()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """Until the loop brings news (bytes, end, room to write): False if `timeout` ran out."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        # call_later rather than asyncio.timeout(): one timer, no task bookkeeping, per read.
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            return bool(await waiter)
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """httpcore's view of one connection, with AnyIO's backend's exception classes."""

    def __init__(self, transport: asyncio.Transport, socket: _Socket) -> None:
        self._transport, self._socket = transport, socket

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        socket = self._socket
        while not socket.buffer and not socket.ended:
            if not await socket.wait(timeout):
                raise httpcore.ReadTimeout("timed out reading the answer")
        if not socket.buffer and socket.lost is not None:
            raise httpcore.ReadError(str(socket.lost)) from socket.lost
        data = bytes(socket.buffer[:max_bytes])
        del socket.buffer[:max_bytes]
        if not socket.ended and len(socket.buffer) <= READ_HIGH_WATER:
            self._transport.resume_reading()
        return data  # b"" at a clean end: h11 then says what the server cut short

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        socket = self._socket
        if socket.ended or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        while not socket.writable:
            if not await socket.wait(timeout):
                raise httpcore.WriteTimeout("timed out writing the request")

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        upgrade = loop.start_tls(
            self._transport, self._socket, ssl_context, server_hostname=server_hostname
        )
        try:
            # Part of opening the connection: nothing was sent, so a failure is a ConnectError.
            tls = await asyncio.wait_for(upgrade, timeout)
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from exc
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        if tls is None:  # the server closed during the handshake
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._socket.transport = tls
        return AsyncioStream(tls, self._socket)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks this of every idle connection on every request: the server spoke
            # out of turn or hung up, so the connection cannot be reused.
            return self._socket.ended or bool(self._socket.buffer)
        names = {"client_addr": "sockname", "server_addr": "peername"}
        return self._transport.get_extra_info(names.get(info, info))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections on the running asyncio loop (uvloop under uvicorn)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = None if local_address is None else (local_address, 0)
        opening = loop.create_connection(_Socket, host, port, local_addr=local)
        try:
            transport, socket = await asyncio.wait_for(opening, timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return AsyncioStream(transport, socket)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's roots, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), made
    once per process and shared by every client the gateway builds.

    Each httpx client and transport otherwise makes its own, and parsing certifi's bundle costs
    25-30 ms a time: three of them were ~80 ms of each cold start, in both modes (issue 13).
    Sharing is safe: a context is only read when a connection opens (httpcore sets the same
    ALPN, HTTP/1.1, on it each time; no client here speaks HTTP/2), and OpenSSL's contexts may
    be used from several threads.
    """
    return httpx.create_ssl_context()


OriginKey = tuple[bytes, bytes, int]


class AsyncioTransport(httpx.AsyncBaseTransport):
    """An httpx transport: keep-alive HTTP/1.1 connections on `AsyncioBackend`, answers read
    whole.

    The pool is a stack of idle connections per origin, not httpcore's `AsyncConnectionPool`:
    that one walks every connection on each request and each answer, and for each idle one
    counts all of them again (`_assign_requests_to_connections`, httpcore 1.0.9), so at 64
    calls in flight a call cost 5 ms of CPU. Here taking and returning a connection is O(1).
    Each connection is httpcore's own (`AsyncHTTPConnection`), which opens it, retries a
    failed open `retries` times, and speaks HTTP/1.1 through h11.
    """

    def __init__(
        self,
        *,
        retries: int = 0,
        limits: httpx.Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        limits = limits or httpx.Limits()
        self._ssl_context = ssl_context or default_ssl_context()
        self._retries = retries
        self._keepalive_expiry = limits.keepalive_expiry
        self._max_idle = limits.max_keepalive_connections or 2**31
        self._slots = asyncio.Semaphore(limits.max_connections or 2**31)
        self._idle: dict[OriginKey, list[httpcore.AsyncHTTPConnection]] = {}
        self._backend = AsyncioBackend()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            await self._take_slot(request.extensions.get("timeout", {}).get("pool"))
            try:
                status, headers, content, extensions = await self._exchange(core)
            finally:
                self._slots.release()
        except _HTTPCORE_ERRORS as exc:
            raise _as_httpx(exc, request) from exc
        return httpx.Response(
            status_code=status, headers=headers, content=content, extensions=extensions
        )

    async def _take_slot(self, timeout: float | None) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # returns at once: no task, no timer
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError as exc:
            raise httpcore.PoolTimeout("no connection came free in time") from exc

    async def _exchange(self, request: httpcore.Request) -> tuple[int, Any, bytes, Any]:
        connection = await self._connection_for(request.url.origin)
        try:
            answer = await connection.handle_async_request(request)
            try:
                content = await answer.aread()
            finally:
                await answer.aclose()
        except BaseException:
            await connection.aclose()  # in an unknown state: never handed out again
            raise
        await self._give_back(connection, request.url.origin)
        return answer.status, answer.headers, content, answer.extensions

    async def _connection_for(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        idle = self._idle.get(_key(origin))
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be expired
            if connection.is_idle() and not connection.has_expired():
                return connection
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(
            origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            retries=self._retries,
            network_backend=self._backend,
        )

    async def _give_back(
        self, connection: httpcore.AsyncHTTPConnection, origin: httpcore.Origin
    ) -> None:
        idle = self._idle.setdefault(_key(origin), [])
        if self._closed or not connection.is_idle() or len(idle) >= self._max_idle:
            await connection.aclose()
        else:
            idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()


def _key(origin: httpcore.Origin) -> OriginKey:
    return origin.scheme, origin.host, origin.port


def _as_httpx(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    kind = next(k for k in type(exc).__mro__ if k in _HTTPX_ERRORS)
    return _HTTPX_ERRORS[kind](str(exc), request=request)

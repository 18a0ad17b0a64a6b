"""What one outbound HTTP call costs the caller's CPU: httpx against lower layers, same process.

    .venv-serve/bin/python -m bench.client_cost            # as the container runs it
    .venv-serve/bin/python -m bench.client_cost --calls 1000 --repeats 3
    .venv-serve/bin/python -m bench.client_cost --server convex   # the Convex imitation instead

Starts the bench's RunPod stand-in (raw ASGI under uvicorn, httptools, uvloop) as the trivial
server on loopback, then makes the same small JSON POST with each client below, on uvloop as the
gateway does, at 1 and 16 calls in flight. For each it reports this process's CPU per call (all
its threads: the client alone), the server process's CPU per call (the other side), and wall
time per call; the fastest of several repeats counts, so it holds on a busy machine. With
`--server convex` the other side is the project's Convex imitation (node), answering
`gateway:ping`: the same client against a server that answers differently on the wire.

Clients, from the gateway's own down to bytes on a socket:
- httpx, as `ConvexStore.from_settings` builds it (`base_url`, auth header, timeouts), `json=`;
- the same with the body encoded once (`content=`), to price httpx's JSON encoding, and with
  the whole request built once (`send()`), to price `build_request`;
- httpx whose pool keeps every connection it may open alive (`max_keepalive_connections=100`,
  httpx's default `max_connections`), where the default keeps 20 and closes the rest;
- httpx on the gateway's own transport (`outbound_http.AsyncioTransport`, what the Convex
  client uses), with httpx's default keep-alive limit and with one sized for every connection;
- httpcore's `AsyncConnectionPool` alone: httpx's transport without httpx's client layers;
- httpx and httpcore on `AsyncioBackend` below, a prototype network backend on plain asyncio
  streams in place of httpcore's AnyIO one (same exception mapping; not TLS-tested: bench only);
- h11 over asyncio streams: the HTTP/1.1 state machine httpcore drives, without the pool;
- raw: the request's bytes written and the answer's head parsed by hand (no HTTP library).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import h11
import httpcore
import httpx
from httpcore import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)

from bench.processes import (
    LOOPBACK,
    ROOT,
    ProcessGroups,
    Server,
    cpu_seconds,
    free_port,
    minimal_env,
)
from outbound_http import AsyncioTransport

CALLS = 2000
REPEATS = 5
# 64: past httpx's default keep-alive pool (20), as Cloud Run's 80 requests at once would be.
IN_FLIGHT = (1, 16, 64)
PATH = "/v2/bench/run"
# About the size of a Convex query the gateway sends (path, args, format).
BODY: dict[str, Any] = {
    "path": "gateway:getJob",
    "args": {"userId": "user_bench", "jobId": "job_Xk3v9QyL0aPz7wRt"},
    "format": "convex_encoded_json",
}
HEADERS = {"Authorization": "Convex prod:cineweave-bench|0123456789abcdef"}

Call = Callable[[], Awaitable[None]]


@dataclass
class Client:
    """One way to make the call: `open` returns (call, close) for a given number in flight."""

    name: str
    open: Callable[[str, int], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]


# --- the clients --------------------------------------------------------------------------------


def _httpx_client(base_url: str, **options: Any) -> httpx.AsyncClient:
    # ConvexStore.from_settings's settings (convex_client.py).
    return httpx.AsyncClient(
        base_url=base_url, headers=HEADERS, timeout=httpx.Timeout(10.0, connect=3.0), **options
    )


def posting(client: httpx.AsyncClient) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """One call: the Convex-shaped POST through `client`; and how to close it."""

    async def call() -> None:
        (await client.post(PATH, json=BODY)).raise_for_status()

    return call, client.aclose


async def open_httpx(base_url: str, in_flight: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = _httpx_client(base_url)
    return posting(client)


async def open_httpx_content(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = _httpx_client(base_url)
    body = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}

    async def call() -> None:
        (await client.post(PATH, content=body, headers=headers)).raise_for_status()

    return call, client.aclose


async def open_httpx_prebuilt(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = _httpx_client(base_url)
    request = client.build_request("POST", PATH, json=BODY)  # its body is bytes: reusable

    async def call() -> None:
        (await client.send(request)).raise_for_status()

    return call, client.aclose


async def open_httpx_tuned(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    client = _httpx_client(base_url, limits=limits)
    return posting(client)


async def open_httpcore(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    pool = httpcore.AsyncConnectionPool()
    url = f"{base_url}{PATH}"
    body = json.dumps(BODY).encode()
    headers = [*HEADERS.items(), ("Content-Type", "application/json")]

    async def call() -> None:
        response = await pool.request("POST", url, headers=headers, content=body)
        if response.status >= 400:
            raise RuntimeError(f"HTTP {response.status}")

    return call, pool.aclose


# --- a network backend on plain asyncio: how much of httpcore's cost is AnyIO ------------------


class AsyncioStream(httpcore.AsyncNetworkStream):
    """httpcore's network stream over asyncio streams, with AnyIOStream's exception mapping."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise ReadTimeout(exc) from exc
        except OSError as exc:
            raise ReadError(exc) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise WriteTimeout(exc) from exc
        except OSError as exc:
            raise WriteError(exc) from exc

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            sock = self._writer.get_extra_info("socket")
            return sock is None or httpcore._utils.is_socket_readable(sock)
        names = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername"}
        return self._writer.get_extra_info(names.get(info, info))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError as exc:
            raise ConnectTimeout(exc) from exc
        except OSError as exc:
            raise ConnectError(exc) from exc
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def open_httpcore_asyncio(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    pool = httpcore.AsyncConnectionPool(network_backend=AsyncioBackend())
    url = f"{base_url}{PATH}"
    body = json.dumps(BODY).encode()
    headers = [*HEADERS.items(), ("Content-Type", "application/json")]

    async def call() -> None:
        response = await pool.request("POST", url, headers=headers, content=body)
        if response.status >= 400:
            raise RuntimeError(f"HTTP {response.status}")

    return call, pool.aclose


async def open_httpx_asyncio(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    transport = httpx.AsyncHTTPTransport()
    # Prototype only: AsyncHTTPTransport takes no network backend, so its pool is swapped.
    transport._pool = httpcore.AsyncConnectionPool(network_backend=AsyncioBackend())
    client = _httpx_client(base_url, transport=transport)
    return posting(client)


async def open_gateway_transport(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = _httpx_client(base_url, transport=AsyncioTransport(retries=1))
    return posting(client)


async def open_gateway_transport_kept(
    base_url: str, in_flight: int
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    client = _httpx_client(base_url, transport=AsyncioTransport(retries=1, limits=limits))
    return posting(client)


class _Connections:
    """Idle keep-alive connections for the h11 and raw clients: one per call in flight."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]] = []

    async def take(self, state: Callable[[], Any]) -> tuple[Any, Any, Any]:
        if self.idle:
            return self.idle.pop()
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        return reader, writer, state()

    async def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


async def open_h11(base_url: str, in_flight: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    connections = _Connections(_port(base_url))
    body = json.dumps(BODY).encode()
    headers = [
        ("Host", base_url.split("//", 1)[1]),
        *HEADERS.items(),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]

    async def call() -> None:
        reader, writer, conn = await connections.take(lambda: h11.Connection(h11.CLIENT))
        writer.write(conn.send(h11.Request(method="POST", target=PATH, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status = await _h11_answer(reader, conn)
        if status >= 400:
            raise RuntimeError(f"HTTP {status}")
        conn.start_next_cycle()
        connections.idle.append((reader, writer, conn))

    return call, connections.close


async def _h11_answer(reader: asyncio.StreamReader, conn: h11.Connection) -> int:
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status


async def open_raw(base_url: str, in_flight: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    connections = _Connections(_port(base_url))
    body = json.dumps(BODY).encode()
    head = [f"POST {PATH} HTTP/1.1", f"Host: {base_url.split('//', 1)[1]}"]
    head += [f"{name}: {value}" for name, value in HEADERS.items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def call() -> None:
        reader, writer, _ = await connections.take(lambda: None)
        writer.write(request)
        answer = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in answer.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if not answer.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(answer.split(b"\r\n", 1)[0].decode())
        connections.idle.append((reader, writer, None))

    return call, connections.close


CLIENTS = (
    Client("httpx, as the gateway's Convex client (json=)", open_httpx),
    Client("httpx, body encoded once (content=)", open_httpx_content),
    Client("httpx, send() of a request built once", open_httpx_prebuilt),
    Client("httpx, max_keepalive_connections=100", open_httpx_tuned),
    Client("httpx on a plain-asyncio network backend (prototype)", open_httpx_asyncio),
    Client("httpx on outbound_http.AsyncioTransport, default limits", open_gateway_transport),
    Client("the same, keep-alive 100: the gateway's Convex client", open_gateway_transport_kept),
    Client("httpcore AsyncConnectionPool alone", open_httpcore),
    Client("httpcore on a plain-asyncio network backend (prototype)", open_httpcore_asyncio),
    Client("h11 over asyncio streams", open_h11),
    Client("raw bytes over asyncio streams", open_raw),
)


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    client_us: float  # this process's CPU per call
    server_us: float  # the server process's CPU per call
    wall_us: float


async def measure(
    client: Client, base_url: str, server_pid: int, in_flight: int, calls: int
) -> Cost:
    call, close = await client.open(base_url, in_flight)
    try:
        await _drive(call, in_flight, calls // 10)  # connections open, caches warm
        cpu, server, wall = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
        await _drive(call, in_flight, calls)
        return Cost(
            (time.process_time() - cpu) / calls * 1e6,
            (cpu_seconds(server_pid) - server) / calls * 1e6,
            (time.perf_counter() - wall) / calls * 1e6,
        )
    finally:
        await close()


async def _drive(call: Call, in_flight: int, calls: int) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(calls // in_flight) for _ in range(in_flight)))


async def measure_all(
    base_url: str, server_pid: int, calls: int, repeats: int, in_flights: list[int]
) -> list[str]:
    rows = [
        "| client | in flight | client CPU µs/call | server CPU µs/call | wall µs/call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for in_flight in in_flights:
        best: dict[str, Cost] = {}
        for _ in range(repeats):
            # Interleaved: a drift of the machine falls on every client alike.
            for client in CLIENTS:
                cost = await measure(client, base_url, server_pid, in_flight, calls)
                if client.name not in best or cost.client_us < best[client.name].client_us:
                    best[client.name] = cost
        for name, cost in best.items():
            rows.append(
                f"| {name} | {in_flight} | {cost.client_us:.0f} | {cost.server_us:.0f} |"
                f" {cost.wall_us:.0f} |"
            )
            print(rows[-1], flush=True)
    return rows


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.client_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="batches; the cheapest counts")
    parser.add_argument("--in-flight", type=_ints, default=list(IN_FLIGHT), help="e.g. 1,16,64")
    parser.add_argument("--server", choices=("stub", "convex"), default="stub")
    return parser.parse_args(argv)


def _start_convex(procs: ProcessGroups, scratch: Path) -> Server:
    """The Convex imitation, and every client aimed at its `gateway:ping` query."""
    from bench.production import DEPLOY_KEY, wait_for_convex

    global PATH, BODY, HEADERS
    PATH, HEADERS = "/api/query", {"Authorization": f"Convex {DEPLOY_KEY}"}
    BODY = {"path": "gateway:ping", "args": {}, "format": "convex_encoded_json"}
    port, log = free_port(), scratch / "convex.log"
    command = ["node", "--import", "tsx", "tests/convex_server/server.mjs", str(port)]
    process = procs.spawn(command, minimal_env(CONVEX_TEST_DEPLOY_KEY=DEPLOY_KEY), ROOT, log)
    wait_for_convex(port, process, log)
    return Server("convex", process, port, 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import uvloop  # the gateway's loop (uvicorn --loop uvloop)

    with ProcessGroups() as procs, tempfile.TemporaryDirectory(prefix="client-cost-") as tmp:
        scratch = Path(tmp)
        log = scratch / "server.log"
        if args.server == "convex":
            server = _start_convex(procs, scratch)
        else:
            server = procs.start_server(
                "stub", "bench.runpod_stub:app", minimal_env(), scratch, log
            )
        print(
            f"{sys.executable}: httpx {httpx.__version__}, httpcore {httpcore.__version__},"
            f" h11 {version('h11')}; server pid {server.pid}",
            flush=True,
        )
        rows = uvloop.run(
            measure_all(server.base_url, server.pid, args.calls, args.repeats, args.in_flight)
        )
    print("\n".join(["", *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

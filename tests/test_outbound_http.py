"""The outbound transport (outbound_http.py) against real servers on loopback: plain and TLS,
reuse, and which failures say "never sent" (safe to resend a mutation) and which "maybe sent".
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from config import Settings
from convex_client import CONNECT_RETRIES, ConvexStore
from errors import StoreUnavailable
from outbound_http import AsyncioTransport, default_ssl_context

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A scripted HTTP/1.1 server: counts connections and requests, answers as `handler` says."""

    def __init__(self, handler: Handler) -> None:
        self.handler, self.connections, self.requests = handler, 0, 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line[15:])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        self.requests += 1
        return True


@asynccontextmanager
async def upstream(
    handler: Callable[[Upstream], Handler], tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Upstream, str]]:
    server = Upstream(lambda r, w: asyncio.sleep(0))
    server.handler = handler(server)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls)
    port = listening.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    async with listening:
        yield server, f"{scheme}://127.0.0.1:{port}"
        listening.close()


def keep_answering(server: Upstream) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()

    return handle


def answer_once_then_hang_up(server: Upstream) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)  # keep-alive by HTTP/1.1's default, then the server closes anyway
        await writer.drain()

    return handle


def read_then_hang_up(server: Upstream) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    return handle


def read_then_never_answer(server: Upstream) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(30)

    return handle


def big_answer(server: Upstream) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        body = b"x" * (3 * 1024 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    return handle


def client(base_url: str, timeout: float = 5.0, **options: object) -> httpx.AsyncClient:
    transport = AsyncioTransport(retries=1, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key) as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


class TestAnswers:
    async def test_answer_and_reuse(self) -> None:
        async with upstream(keep_answering) as (server, url), client(url) as http:
            answers = [await http.post("/api/query", json={"n": n}) for n in range(3)]
        assert [(a.status_code, a.json()) for a in answers] == [(200, {"ok": True})] * 3
        assert (server.connections, server.requests) == (1, 3)

    async def test_many_in_flight(self) -> None:
        async with upstream(keep_answering) as (server, url), client(url) as http:
            answers = await asyncio.gather(*(http.get("/") for _ in range(50)))
        assert {a.status_code for a in answers} == {200}
        assert server.requests == 50

    async def test_large_answer_read_whole(self) -> None:
        async with upstream(big_answer) as (_, url), client(url) as http:
            answer = await http.get("/")
        assert len(answer.content) == 3 * 1024 * 1024

    async def test_connection_the_server_closed_is_not_reused(self) -> None:
        async with upstream(answer_once_then_hang_up) as (server, url), client(url) as http:
            first = await http.get("/")
            await asyncio.sleep(0.05)  # the server's close reaches this side
            second = await http.get("/")
        assert (first.status_code, second.status_code) == (200, 200)
        assert (server.connections, server.requests) == (2, 2)

    async def test_tls(self, certificate: tuple[Path, Path]) -> None:
        trusting = ssl.create_default_context(cafile=str(certificate[0]))
        async with (
            upstream(keep_answering, tls=server_tls(certificate)) as (server, url),
            client(url, ssl_context=trusting) as http,
        ):
            answers = [await http.get("/") for _ in range(2)]
        assert [a.json() for a in answers] == [{"ok": True}] * 2
        assert server.connections == 1


class TestNeverSentOrMaybeSent:
    """Only a connection that never opened is a ConnectError: the one failure a mutation may be
    sent again after (convex_client.py's `_NEVER_SENT`)."""

    async def test_refused_connection_is_connect_error(self) -> None:
        async with upstream(keep_answering) as (_, url):
            pass  # closed again: nothing listens on the port now
        async with client(url) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get("/")

    async def test_untrusted_certificate_is_connect_error(
        self, certificate: tuple[Path, Path]
    ) -> None:
        async with (
            upstream(keep_answering, tls=server_tls(certificate)) as (server, url),
            client(url) as http,  # certifi's roots: the self-signed certificate is refused
        ):
            with pytest.raises(httpx.ConnectError):
                await http.get("/")
        assert server.requests == 0

    async def test_hang_up_after_the_request_is_not_connect_error(self) -> None:
        async with upstream(read_then_hang_up) as (server, url), client(url) as http:
            with pytest.raises(httpx.TransportError) as raised:
                await http.post("/api/mutation", json={"charge": 1})
        assert isinstance(raised.value, httpx.RemoteProtocolError | httpx.ReadError)
        assert not isinstance(raised.value, httpx.ConnectError | httpx.ConnectTimeout)
        assert server.requests == 1  # and the transport did not send it again

    async def test_no_answer_is_read_timeout(self) -> None:
        async with (
            upstream(read_then_never_answer) as (server, url),
            client(url, timeout=0.2) as http,
        ):
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/api/mutation", json={"charge": 1})
        assert server.requests == 1


class TestOnUvloop:
    """uvicorn runs the gateway on uvloop, whose transports differ from asyncio's own."""

    def test_answers_plain_and_tls(self, certificate: tuple[Path, Path]) -> None:
        import uvloop

        async def scenario() -> list[int]:
            trusting = ssl.create_default_context(cafile=str(certificate[0]))
            async with (
                upstream(keep_answering) as (_, plain),
                upstream(keep_answering, tls=server_tls(certificate)) as (_, tls),
                client(plain) as plain_http,
                client(tls, ssl_context=trusting) as tls_http,
            ):
                answers = [await plain_http.get("/"), await tls_http.get("/")]
                answers += await asyncio.gather(*(plain_http.get("/") for _ in range(20)))
            return [answer.status_code for answer in answers]

        assert uvloop.run(scenario()) == [200] * 22


def convex_store(url: str) -> ConvexStore:
    settings = Settings(_env_file=None, convex_url=url, convex_deploy_key=SecretStr("k"))
    return ConvexStore.from_settings(settings)


class TestThroughConvexStore:
    """What the store's resend rule sees through this transport: a user gets 503, and a mutation
    is sent again only when it surely never left."""

    async def test_connection_that_never_opened_is_retried_once_by_the_transport(
        self, certificate: tuple[Path, Path]
    ) -> None:
        # The self-signed certificate fails every handshake: a connection that never opened.
        tls, hellos = server_tls(certificate), []

        def hello(*_: object) -> None:
            hellos.append(1)  # each handshake begins with the client's hello

        tls.sni_callback = hello
        async with upstream(keep_answering, tls=tls) as (server, url):
            store = convex_store(url)
            with pytest.raises(StoreUnavailable):
                await store.grant_credits("user_a", 5, "test")
            await store.close()
        assert (len(hellos), server.requests) == (1 + CONNECT_RETRIES, 0)

    async def test_mutation_cut_off_after_sending_is_not_sent_again(self) -> None:
        async with upstream(read_then_hang_up) as (server, url):
            store = convex_store(url)
            with pytest.raises(StoreUnavailable):
                await store.grant_credits("user_a", 5, "test")
            await store.close()
        assert (server.connections, server.requests) == (1, 1)


def test_every_client_shares_one_default_tls_context() -> None:
    """Parsing certifi's roots costs 25-30 ms a context: the process makes one (issue 13),
    and it verifies as httpx's own does."""
    context = default_ssl_context()
    assert context is default_ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert AsyncioTransport()._ssl_context is context

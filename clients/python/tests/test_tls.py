"""TLS: both clients against a queueberd serving TLS (``--tls-cert``,
``--tls-key``, and ``--tls-client-ca`` for client certificates).

The certificates are made here with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate, and a second
CA that signed none of them.
"""

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import Server, aio_test

import queueber
from queueber import aio

OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command"),
    # Every test here waits on a server: bounded on its own too.
    pytest.mark.timeout(60),
]

#: Connect timeout of every client here: a failure must come well before it.
CONNECT_TIMEOUT_S = 10.0

TLS_ENV = ("QUEUEBER_TLS", "QUEUEBER_TLS_CA", "QUEUEBER_TLS_CLIENT_CERT",
           "QUEUEBER_TLS_CLIENT_KEY", "QUEUEBER_TLS_SERVER_NAME")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of the above, but:
    stranger_cert: Path  # a client certificate of other_ca
    stranger_key: Path


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"), "-days", "2",
             "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, ca: str, name: str, serial: int, usage: str, san: str) -> None:
    key, csr, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\n"
                   f"subjectAltName={san}\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / f"{ca}.pem"),
             "-CAkey", str(d / f"{ca}.key"), "-set_serial", str(serial), "-days", "2",
             "-out", str(d / f"{name}.pem"), "-extfile", str(ext))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "ca", "server", 2, "serverAuth", "IP:127.0.0.1,DNS:localhost")
    _make_leaf(d, "ca", "client", 3, "clientAuth", "DNS:worker.test")
    _make_leaf(d, "other-ca", "stranger", 4, "clientAuth", "DNS:stranger.test")
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key",
               other_ca=d / "other-ca.pem", stranger_cert=d / "stranger.pem",
               stranger_key=d / "stranger.key")


@pytest.fixture(autouse=True)
def no_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the QUEUEBER_TLS* variables themselves."""
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[Server]:
    """TLS on its port, no client certificates asked."""
    s = Server("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[Server]:
    """TLS requiring client certificates signed by the test CA."""
    s = Server("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
               "--tls-client-ca", str(pki.ca))
    yield s
    s.cleanup()


# -- over TLS ------------------------------------------------------------------


@aio_test
async def test_aio_add_poll_remove_over_tls(tls_server: Server, pki: Pki, queue: str) -> None:
    async with aio.connect(tls_server.addr, tls_ca=pki.ca,
                           connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.tls_context is not None and qb.tls_server_name == "127.0.0.1"
        assert (await qb.hello()).version
        ids = await qb.add(queue, [b"a", b"b", "c"])
        assert len(ids) == 3
        lease = await qb.poll(queue, max_items=10, lease_ms=10000, wait_ms=100)
        assert [m.payload for m in lease] == [b"a", b"b", b"c"]
        assert await qb.remove(queue, lease, lease.messages) == [True, True, True]
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


@aio_test
async def test_aio_pipelining_and_large_payloads_over_tls(tls_server: Server, pki: Pki,
                                                          queue: str) -> None:
    """Frames larger than a TLS record, and many requests in one write."""
    async with aio.connect(tls_server.addr, tls_ca=pki.ca,
                           connect_timeout=CONNECT_TIMEOUT_S) as qb:
        big = os.urandom(200_000)
        await qb.add(queue, [big])
        results = await asyncio.gather(*(qb.add(queue, [b"%d" % i]) for i in range(500)))
        assert len(results) == 500
        assert (await qb.stats(queue)).visible == 501
        lease = await qb.poll(queue, max_items=1, lease_ms=10000)
        assert lease.messages[0].payload == big
        assert await qb.purge(queue) == 501


@aio_test
async def test_close_answers_parked_polls_over_tls(tls_server: Server, pki: Pki,
                                                   queue: str) -> None:
    """close() half-closes over TLS too (close_notify, then FIN), so the
    server answers a parked poll at once, empty, instead of at its wait."""
    qb = await aio.connect(tls_server.addr, tls_ca=pki.ca, connect_timeout=CONNECT_TIMEOUT_S)
    await qb.add(queue, [b"x"])
    await qb.poll(queue, lease_ms=60000)  # the only message, leased
    parked = asyncio.ensure_future(qb.poll(queue, wait_ms=20000))
    await asyncio.sleep(0.2)
    assert not parked.done()
    started = time.monotonic()
    await asyncio.wait_for(qb.close(), 8)
    assert not await asyncio.wait_for(parked, 1)
    assert time.monotonic() - started < 5


@aio_test
async def test_reconnect_is_over_tls_too(tls_server: Server, pki: Pki, queue: str) -> None:
    async with aio.connect(tls_server.addr, tls_ca=pki.ca,
                           connect_timeout=CONNECT_TIMEOUT_S) as qb:
        await qb.add(queue, [b"x"])
        conn = qb._conn
        assert conn is not None and conn.transport is not None
        conn.transport.abort()
        await asyncio.wait_for(conn.closed, 5)
        assert (await qb.stats(queue)).visible == 1  # on a new TLS connection
        assert qb._conn is not conn
        assert await qb.purge(queue) == 1


@aio_test
async def test_consume_over_tls(tls_server: Server, pki: Pki, queue: str) -> None:
    async with aio.connect(tls_server.addr, tls_ca=pki.ca,
                           connect_timeout=CONNECT_TIMEOUT_S) as qb:
        await qb.add(queue, [b"%d" % i for i in range(20)])
        got: List[bytes] = []
        async with qb.consume(queue, batch=8, wait_ms=200) as consumer:
            async for msg in consumer:
                async with msg:
                    got.append(msg.payload)
                if len(got) == 20:
                    break
        assert sorted(got) == sorted(b"%d" % i for i in range(20))
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


def test_sync_add_poll_remove_over_tls(tls_server: Server, pki: Pki, queue: str) -> None:
    with queueber.connect(tls_server.addr, tls_ca=str(pki.ca),
                          connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.tls_context is not None
        assert qb.add(queue, [b"a", b"b"])
        lease = qb.poll(queue, max_items=5, lease_ms=10000, wait_ms=100)
        assert [m.payload for m in lease] == [b"a", b"b"]
        assert qb.remove(queue, lease, lease.messages) == [True, True]
        with qb.consume(queue, batch=4, wait_ms=100) as consumer:
            qb.add(queue, [b"c"])
            for msg in consumer:
                with msg:
                    assert msg.payload == b"c"
                break
        assert qb.stats(queue).visible == 0


def test_server_names(tls_server: Server, pki: Pki, queue: str) -> None:
    """The name checked is the host connected to (an IP address or a DNS
    name of the certificate), or tls_server_name."""
    port = tls_server.port
    with queueber.connect(f"localhost:{port}", tls_ca=pki.ca,
                          connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.hello().version
    with queueber.connect(f"127.0.0.1:{port}", tls_ca=pki.ca, tls_server_name="localhost",
                          connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.hello().version
    started = time.monotonic()
    with pytest.raises(queueber.TLSError) as e:
        queueber.connect(tls_server.addr, tls_ca=pki.ca, tls_server_name="qb.example",
                         connect_timeout=CONNECT_TIMEOUT_S)
    assert "qb.example" in str(e.value) and not e.value.retryable
    assert isinstance(e.value, queueber.ConnectionClosed)
    assert time.monotonic() - started < 5


def test_untrusted_certificate(tls_server: Server, pki: Pki) -> None:
    started = time.monotonic()
    with pytest.raises(queueber.TLSError) as e:
        queueber.connect(tls_server.addr, tls_ca=pki.other_ca, connect_timeout=CONNECT_TIMEOUT_S)
    assert "certificate" in str(e.value).lower()
    assert time.monotonic() - started < 5


@aio_test
async def test_an_ssl_context_as_is(tls_server: Server, pki: Pki, queue: str) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    async with aio.connect(tls_server.addr, tls=ctx, connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.tls_context is ctx
        await qb.add(queue, [b"x"])
        assert await qb.purge(queue) == 1


# -- the wrong side of a port ----------------------------------------------------


@aio_test
async def test_plaintext_client_on_the_tls_port(tls_server: Server) -> None:
    """The server says so in the protocol (id 0, invalidArgument) and
    closes; the pending hello fails with that error, not a hang."""
    started = time.monotonic()
    with pytest.raises(queueber.InvalidArgument) as e:
        await aio.connect(tls_server.addr, connect_timeout=CONNECT_TIMEOUT_S)
    assert "TLS" in e.value.message and e.value.connection_level
    assert time.monotonic() - started < 5


def test_sync_plaintext_client_on_the_tls_port(tls_server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(queueber.InvalidArgument, match="TLS"):
        queueber.connect(tls_server.addr, tls=False, connect_timeout=CONNECT_TIMEOUT_S)
    assert time.monotonic() - started < 5


@aio_test
async def test_tls_client_on_a_plaintext_port(server: Server, pki: Pki) -> None:
    started = time.monotonic()
    with pytest.raises(queueber.TLSError) as e:
        await aio.connect(server.addr, tls_ca=pki.ca, connect_timeout=CONNECT_TIMEOUT_S)
    assert "handshake" in str(e.value)
    assert time.monotonic() - started < 5
    with pytest.raises(queueber.TLSError):
        queueber.connect(server.addr, tls_ca=pki.ca, connect_timeout=CONNECT_TIMEOUT_S)


@aio_test
async def test_id_zero_error_fails_the_calls_left_unanswered() -> None:
    """An id-0 error is about the connection: the client keeps reading (the
    server may still answer what it had read), and at EOF the calls left
    unanswered fail with that error, not a generic ConnectionClosed."""
    import queueber._wire as wire

    def reply(rid: int, op: str) -> bytes:
        resp = wire.schema.Response.new_message()
        resp.id = rid
        if op == "hello":
            hello = resp.init("hello")
            hello.version = "fake"
            hello.shards = 1
            hello.limits.maxInFlightPerConnection = 100
            hello.limits.maxMessagesPerAdd = 100
        elif op == "stats":
            resp.init("stats").visible = 7
        else:
            err = resp.init("error")
            err.code = "invalidArgument"
            err.message = "this port speaks TLS"
        return resp.to_bytes()  # type: ignore[no-any-return]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf, seen = b"", []
        try:
            while len(seen) < 4:  # hello, then three requests
                size = wire.frame_length(buf, 0)
                if size == 0 or len(buf) < size:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                frame, buf = buf[:size], buf[size:]
                with wire.schema.Request.from_bytes(frame) as req:
                    seen.append((req.id, req.which()))
                if len(seen) == 1:
                    writer.write(reply(*seen[0]))
            writer.write(reply(0, "error"))  # about the connection
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(reply(*seen[2]))  # the second request still answered
            await writer.drain()
            while await reader.read(65536):  # until the client's EOF
                pass
        finally:
            writer.close()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    addr = "127.0.0.1:%d" % fake.sockets[0].getsockname()[1]
    try:
        async with aio.connect(addr, tls=False, connect_timeout=CONNECT_TIMEOUT_S) as qb:
            conn = qb._conn
            results = await asyncio.gather(qb.purge("q"), qb.stats("q"), qb.purge("q"),
                                           return_exceptions=True)
            assert isinstance(results[0], queueber.InvalidArgument)
            assert results[0].connection_level and "TLS" in results[0].message
            assert isinstance(results[1], queueber.QueueStats) and results[1].visible == 7
            assert isinstance(results[2], queueber.InvalidArgument)
            assert conn is not None and not conn.usable
    finally:
        fake.close()
        await fake.wait_closed()


# -- client certificates ------------------------------------------------------------


def test_client_certificate_required(mtls_server: Server, pki: Pki, queue: str) -> None:
    started = time.monotonic()
    # Refused in the handshake, or (TLS 1.3: the client's side of the
    # handshake is done first) with an alert at the first request.
    with pytest.raises(queueber.ConnectionClosed):
        queueber.connect(mtls_server.addr, tls_ca=pki.ca, connect_timeout=CONNECT_TIMEOUT_S)
    assert time.monotonic() - started < 5
    # A certificate of a CA the server does not trust is refused too.
    with pytest.raises(queueber.ConnectionClosed):
        queueber.connect(mtls_server.addr, tls_ca=pki.ca, tls_client_cert=pki.stranger_cert,
                         tls_client_key=pki.stranger_key, connect_timeout=CONNECT_TIMEOUT_S)
    assert time.monotonic() - started < 10
    with queueber.connect(mtls_server.addr, tls_ca=pki.ca, tls_client_cert=pki.client_cert,
                          tls_client_key=pki.client_key,
                          connect_timeout=CONNECT_TIMEOUT_S) as qb:
        qb.add(queue, [b"x"])
        lease = qb.poll(queue, lease_ms=10000)
        assert qb.remove(queue, lease, lease.messages) == [True]


@aio_test
async def test_aio_client_certificate(mtls_server: Server, pki: Pki, queue: str) -> None:
    with pytest.raises(queueber.ConnectionClosed):
        await aio.connect(mtls_server.addr, tls=True, tls_ca=pki.ca,
                          connect_timeout=CONNECT_TIMEOUT_S)
    async with aio.connect(mtls_server.addr, tls_ca=pki.ca, tls_client_cert=pki.client_cert,
                           tls_client_key=pki.client_key,
                           connect_timeout=CONNECT_TIMEOUT_S) as qb:
        await qb.add(queue, [b"x"])
        assert await qb.purge(queue) == 1


# -- settings and the environment ---------------------------------------------------


def test_environment_variables(tls_server: Server, mtls_server: Server, pki: Pki,
                               monkeypatch: pytest.MonkeyPatch, queue: str) -> None:
    monkeypatch.setenv("QUEUEBER_TLS_CA", str(pki.ca))  # implies TLS
    with queueber.connect(tls_server.addr, connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.tls_context is not None
        qb.add(queue, [b"x"])
        assert qb.purge(queue) == 1
    # tls=False wins over the environment: plaintext, refused by the TLS port.
    with pytest.raises(queueber.InvalidArgument, match="TLS"):
        queueber.connect(tls_server.addr, tls=False, connect_timeout=CONNECT_TIMEOUT_S)

    monkeypatch.setenv("QUEUEBER_TLS_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("QUEUEBER_TLS_CLIENT_KEY", str(pki.client_key))
    with queueber.connect(mtls_server.addr, connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.hello().version

    monkeypatch.setenv("QUEUEBER_TLS_SERVER_NAME", "qb.example")
    with pytest.raises(queueber.TLSError, match="qb.example"):
        queueber.connect(tls_server.addr, connect_timeout=CONNECT_TIMEOUT_S)
    # The argument wins over the variable.
    with queueber.connect(tls_server.addr, tls_server_name="localhost",
                          connect_timeout=CONNECT_TIMEOUT_S) as qb:
        assert qb.hello().version


def test_queueber_tls_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """QUEUEBER_TLS alone turns TLS on (trusting the system's roots)."""
    assert aio.Client("127.0.0.1:1").tls_context is None
    monkeypatch.setenv("QUEUEBER_TLS", "true")
    assert aio.Client("127.0.0.1:1").tls_context is not None
    assert aio.Client("127.0.0.1:1", tls=False).tls_context is None
    monkeypatch.setenv("QUEUEBER_TLS", "false")
    assert aio.Client("127.0.0.1:1").tls_context is None
    monkeypatch.setenv("QUEUEBER_TLS", "maybe")
    with pytest.raises(ValueError, match="QUEUEBER_TLS"):
        aio.Client("127.0.0.1:1")
    monkeypatch.setenv("QUEUEBER_TLS", "")  # empty: unset
    assert aio.Client("127.0.0.1:1").tls_context is None


def test_settings_are_checked_up_front(pki: Pki, tmp_path: Path) -> None:
    threads = _client_threads()
    with pytest.raises(ValueError, match="together"):
        queueber.connect("127.0.0.1:1", tls_client_cert=pki.client_cert)
    with pytest.raises(ValueError, match="together"):
        aio.Client("127.0.0.1:1", tls_ca=pki.ca, tls_client_key=pki.client_key)
    with pytest.raises(ValueError, match="tls=False"):
        aio.Client("127.0.0.1:1", tls=False, tls_ca=pki.ca)
    with pytest.raises(ValueError, match="SSLContext"):
        aio.Client("127.0.0.1:1", tls=ssl.create_default_context(), tls_ca=pki.ca)
    with pytest.raises(ValueError, match="missing.pem"):
        queueber.connect("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="not.pem"):
        aio.Client("127.0.0.1:1", tls_ca=not_pem)
    with pytest.raises(ValueError, match="client"):
        aio.Client("127.0.0.1:1", tls_ca=pki.ca, tls_client_cert=pki.client_cert,
                   tls_client_key=pki.server_key)  # not the certificate's key
    with pytest.raises(TypeError):
        aio.Client("127.0.0.1:1", tls="yes")  # type: ignore[arg-type]
    # The blocking client raised before starting its thread.
    assert _client_threads() == threads


def _client_threads() -> int:
    import threading
    return sum(1 for t in threading.enumerate() if t.name == "queueber-client")

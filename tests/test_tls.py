"""TLS on both ports, with a certificate authority the test makes (``trustme``): the TCP
client, the sync client and the batcher over TLS; HTTPS ingest and usage; ``meter serve
--tls-cert --tls-key`` as a process; clients that never finish a handshake are closed
within the handshake timeout while the server keeps serving; and the bind policy (no
non-loopback address without keys and TLS), checked before anything binds."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import trio
import trustme

from engine import Engine, Meter, Query
from engine.auth import parse_keys
from engine.cli import main
from engine.client import SyncClient, open_batcher, open_client
from engine.errors import ConnectionLost, InsecureBind
from engine.http import HttpConfig, HttpServer
from engine.protocol.connection import encode_message_frame
from engine.protocol.messages import PROTOCOL_VERSION, Hello
from engine.server import MeterServer, ServerConfig, check_bind, server_ssl_context
from tests.conftest import HOST, NOW
from tests.helpers.events import DAY, event, now_ms
from tests.helpers.serve import serve_in
from tests.http_support import http, open_http

KEYS = parse_keys({"keys": [{"key": "admin-key", "scopes": ["admin", "ingest", "query"]}]})
ALL = Query(meter_api_name="calls", start_ms=NOW - DAY, end_ms=NOW + DAY)
Serving = Callable[..., AbstractAsyncContextManager[MeterServer]]
PUBLIC_HOSTS = ["0.0.0.0", "::", "", "192.0.2.10", "meter.example.com"]


@dataclass(frozen=True)
class Certificates:
    ca_file: str
    cert_file: str  # the server's chain, for 127.0.0.1 and localhost
    key_file: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def server_context(self) -> ssl.SSLContext:
        return server_ssl_context(self.cert_file, self.key_file)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = (directory / name for name in ("ca.pem", "cert.pem",
                                                                   "key.pem"))
    authority.cert_pem.write_to_path(str(ca_file))
    issued.private_key_pem.write_to_path(str(key_file))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    yield Certificates(str(ca_file), str(cert_file), str(key_file))


# ------------------------------------------------------------------ TCP over TLS


async def test_tcp_client_over_tls_hello_ingest_query(
        engine: Engine, serving: Serving, certificates: Certificates) -> None:
    async with serving(engine, keys=KEYS, ssl_context=certificates.server_context()) as server:
        with trio.fail_after(20):
            async with open_client(HOST, server.port, "admin-key",
                                   ssl_context=certificates.client_context()) as client:
                assert client.welcome is not None
                await client.define_meter(Meter(name="calls"))
                ack = await client.ingest([event(meter_value=2, unique_id="a"),
                                           event(meter_value=3, unique_id="b")])
                assert (ack.accepted, ack.duplicates) == (2, 0)
                result = await client.query(ALL)
                assert [row.value for row in result.rows] == [5]
            async with open_batcher(HOST, server.port, "admin-key", flush_interval_s=60,
                                    ssl_context=certificates.client_context()) as batcher:
                await batcher.add(event(meter_value=7, unique_id="c"))
            assert batcher.statistics().accepted == 1

            def blocking() -> object:
                with SyncClient(HOST, server.port, "admin-key",
                                ssl_context=certificates.client_context()) as sync:
                    return sync.query(ALL).rows[0].value

            assert await trio.to_thread.run_sync(blocking) == 12
        assert server.statistics().protocol_errors == 0


async def test_a_client_that_does_not_trust_the_certificate_is_told_why(
        engine: Engine, serving: Serving, certificates: Certificates) -> None:
    stranger = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    async with serving(engine, ssl_context=certificates.server_context()) as server:
        with trio.fail_after(20), pytest.raises(ConnectionLost, match="certificate verify"):
            async with open_client(HOST, server.port, ssl_context=stranger):
                pass
        # A TLS client against a plain port fails the handshake too, with ConnectionLost.
    async with serving(engine) as plain:
        with trio.fail_after(20), pytest.raises(ConnectionLost, match="TLS handshake"):
            async with open_client(HOST, plain.port, ssl_context=certificates.client_context()):
                pass


async def _read_until_closed(stream: trio.abc.Stream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_clients_that_never_finish_a_tls_handshake_are_closed_in_time(
        engine: Engine, serving: Serving, certificates: Certificates) -> None:
    timeout_s = 0.5
    async with serving(engine, ssl_context=certificates.server_context(),
                       handshake_timeout_s=timeout_s) as server:
        with trio.fail_after(20):
            # A plain-TCP client saying hello to the TLS port: not a TLS record, so the
            # handshake fails at once; the client gets no welcome, at most a TLS alert.
            plain = await trio.open_tcp_stream(HOST, server.port)
            async with plain:
                await plain.send_all(encode_message_frame(
                    Hello(version=PROTOCOL_VERSION, api_key=None, client="plain")))
                answer = await _read_until_closed(plain)
            assert answer == b"" or answer[0] == 0x15, answer  # 0x15: a TLS alert record

            # A handshake that stalls: the first bytes of a TLS record, then nothing. The
            # server closes it once the handshake timeout has passed, and meanwhile serves.
            stalled = await trio.open_tcp_stream(HOST, server.port)
            async with stalled:
                started = time.perf_counter()
                await stalled.send_all(b"\x16\x03\x01")
                async with open_client(HOST, server.port,
                                       ssl_context=certificates.client_context()) as client:
                    await client.define_meter(Meter(name="calls"))
                    assert (await client.ingest([event(unique_id="x")])).accepted == 1
                assert await _read_until_closed(stalled) == b""
                waited_s = time.perf_counter() - started
            assert waited_s >= timeout_s * 0.9, waited_s

            # Both count as protocol errors, and neither holds a connection slot.
            while server.statistics().connections:
                await trio.sleep(0.01)
            stats = server.statistics()
            assert (stats.protocol_errors, stats.connections_total) == (2, 3)
            async with open_client(HOST, server.port,
                                   ssl_context=certificates.client_context()) as client:
                assert [row.value for row in (await client.query(ALL)).rows] == [1]


async def test_a_tcp_client_that_sends_nothing_over_tls_is_closed_after_the_hello_timeout(
        engine: Engine, serving: Serving, certificates: Certificates) -> None:
    async with serving(engine, ssl_context=certificates.server_context(),
                       handshake_timeout_s=0.5) as server:
        with trio.fail_after(20):
            tcp = await trio.open_tcp_stream(HOST, server.port)
            stream = trio.SSLStream(tcp, certificates.client_context(), server_hostname=HOST)
            async with stream:
                await stream.do_handshake()  # TLS is through; the hello never comes
                answer = await _read_until_closed(stream)
            assert b"timeout" in answer, answer  # the error frame names the timeout
        assert server.statistics().protocol_errors == 1


# ------------------------------------------------------------------ HTTP over TLS


async def test_https_ingest_and_usage(engine: Engine, certificates: Certificates) -> None:
    await engine.define_meter(Meter(name="api_calls", aggregation="sum"))
    async with open_http(engine, tls_cert_file=certificates.cert_file,
                         tls_key_file=certificates.key_file) as server:
        base = f"https://127.0.0.1:{server.port}"
        records = [{"customerId": "acme", "meterApiName": "api_calls", "meterValue": value,
                    "meterTimeInMillis": NOW - 3_600_000, "uniqueId": f"u{value}"}
                   for value in (2, 5)]
        ingested = await http("POST", f"{base}/ingest", json=records,
                              verify=certificates.ca_file)
        assert (ingested.status_code, ingested.text) == (200, "2 records were ingested")
        usage = await http("POST", f"{base}/usage", verify=certificates.ca_file, json={
            "meterApiName": "api_calls", "aggregation": "sum", "timeGroupingInterval": "day",
            "timeRange": {"startTimeInSeconds": NOW // 1000 - 86_400,
                          "endTimeInSeconds": NOW // 1000}})
        assert usage.status_code == 200, usage.text
        assert [value["value"] for meter in usage.json()["clientMeters"]
                for value in meter["values"] if value["value"]] == [7]
        # Plain HTTP to the HTTPS port gets no answer, and the server goes on serving.
        with pytest.raises(requests.ConnectionError):
            await http("GET", f"http://127.0.0.1:{server.port}/healthz")
        healthy = await http("GET", f"{base}/healthz", verify=certificates.ca_file)
        assert healthy.status_code == 200
    result = await engine.query(Query(meter_api_name="api_calls", start_ms=0, end_ms=NOW))
    assert [row.value for row in result.rows] == [7]


# ---------------------------------------------------------------- meter serve


def test_meter_serve_with_tls_serves_both_ports(tmp_path: Path,
                                                certificates: Certificates) -> None:
    start_ms = now_ms()
    flags = ("--tls-cert", certificates.cert_file, "--tls-key", certificates.key_file,
             "--http-port", "0", "--handshake-timeout", "2")
    with serve_in(tmp_path, *flags) as server:
        startup = "".join(server.lines)
        assert f"listening on 127.0.0.1:{server.port} (TLS, " in startup, startup
        ready = [line for line in server.lines if line.startswith("HTTP ready on https://")]
        assert ready, startup
        base = ready[0].split()[3].rstrip("/")
        context = certificates.client_context()

        async def over_tcp(query: bool) -> object:
            with trio.fail_after(20):
                async with open_client(HOST, server.port, ssl_context=context) as client:
                    if not query:
                        await client.define_meter(Meter(name="api_calls"))
                        return None
                    result = await client.query(Query(meter_api_name="api_calls",
                                                      start_ms=start_ms - 60_000,
                                                      end_ms=now_ms() + 60_000))
                    return [row.value for row in result.rows]

        trio.run(over_tcp, False)
        records = [{"meterApiName": "api_calls", "customerId": "acme", "meterValue": 3,
                    "meterTimeInMillis": start_ms, "uniqueId": f"u{i}"} for i in range(2)]
        answer = requests.post(f"{base}/ingest", json=records, timeout=10,
                               verify=certificates.ca_file)
        assert (answer.status_code, answer.text) == (200, "2 records were ingested")
        assert trio.run(over_tcp, True) == [6]
        # A plain client on the TLS port is closed (here the server's handshake timeout
        # is 2 s; the read is bounded by 20) and the server keeps serving.
        with socket.create_connection((HOST, server.port), timeout=20) as plain:
            plain.sendall(b"\x00\x00\x00\x05hello")
            assert plain.recv(65536)[:1] in (b"", b"\x15")
        assert trio.run(over_tcp, True) == [6]
        assert server.terminate() == 0
    assert not server.errors_logged(), server.errors_logged()


def test_meter_serve_needs_both_tls_files(tmp_path: Path, certificates: Certificates,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                 "--tls-cert", certificates.cert_file])
    assert code == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- bind policy


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_a_public_bind_needs_keys_and_tls(host: str) -> None:
    with pytest.raises(InsecureBind, match=r"without TLS: .*--tls-cert FILE --tls-key FILE"):
        check_bind(host, keys_enabled=True, tls=False, allow_insecure_bind=False)
    with pytest.raises(InsecureBind, match=r"without API keys: .*--keys FILE"):
        check_bind(host, keys_enabled=False, tls=True, allow_insecure_bind=False)
    with pytest.raises(InsecureBind, match=r"without API keys and TLS.*--allow-insecure-bind"):
        check_bind(host, keys_enabled=False, tls=False, allow_insecure_bind=False)
    check_bind(host, keys_enabled=True, tls=True, allow_insecure_bind=False)
    check_bind(host, keys_enabled=False, tls=False, allow_insecure_bind=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_neither_keys_nor_tls(host: str) -> None:
    check_bind(host, keys_enabled=False, tls=False, allow_insecure_bind=False)


async def test_servers_refuse_a_public_bind_without_tls_when_constructed(
        engine: Engine, certificates: Certificates) -> None:
    host = "192.0.2.10"  # TEST-NET-1: never bound here, the constructors refuse first
    with pytest.raises(InsecureBind, match="without TLS"):
        MeterServer(engine, ServerConfig(host=host, port=0, keys=KEYS))
    MeterServer(engine, ServerConfig(host=host, port=0, keys=KEYS,
                                     ssl_context=certificates.server_context()))
    with pytest.raises(InsecureBind, match=r"serve HTTP on .192\.0\.2\.10. without TLS"):
        HttpServer(engine, HttpConfig(host=host, port=0, keys=KEYS))
    HttpServer(engine, HttpConfig(host=host, port=0, keys=KEYS,
                                  tls_cert_file=certificates.cert_file,
                                  tls_key_file=certificates.key_file))
    with pytest.raises(ValueError, match="both"):
        HttpServer(engine, HttpConfig(tls_cert_file=certificates.cert_file))


def test_meter_serve_refuses_a_public_bind_without_tls_before_binding(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"key": "k", "scopes": ["admin"]}]}')
    code = main(["serve", "--data-dir", str(tmp_path / "data"), "--host", "192.0.2.10",
                 "--port", "0", "--http-port", "0", "--keys", str(keys)])
    assert code == 1
    error = capsys.readouterr().err
    assert "refusing to listen on '192.0.2.10' without TLS" in error, error
    assert "--allow-insecure-bind" in error
    assert not (tmp_path / "data").exists()  # refused before the engine opened


def test_an_encrypted_key_is_refused_instead_of_prompting(
        tmp_path: Path, certificates: Certificates,
        capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(certificates.key_file).read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ssl.SSLError, match="is encrypted"):
        server_ssl_context(certificates.cert_file, str(encrypted))
    code = main(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                 "--tls-cert", certificates.cert_file, "--tls-key", str(encrypted)])
    assert code == 1
    assert "is encrypted" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()

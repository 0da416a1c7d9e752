"""The agent's /metrics endpoint (export/httpserver.py): it answers scrapes whatever other
clients do (idle, slow, too many, oversized, not TLS), over HTTP or HTTPS with client
certificates, and stops cleanly."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.export.httpserver import Limits, MetricsHttpServer, ServerCollector, TlsOptions
from tcptrace.export.prometheus import AgentCollector, families, make_registry, sample_value, text_of
from tcptrace.model.agent import ExportState


def registry() -> Any:
    collector = AgentCollector()
    collector.publish(families(ExportState(threshold_s=5, events_decoded=7)))
    return make_registry(collector, process_metrics=False)


@pytest.fixture
def server() -> Iterator[MetricsHttpServer]:
    srv = MetricsHttpServer("127.0.0.1", 0, registry(), limits=Limits(request_timeout_s=1.0))
    yield srv
    assert srv.stop(), "the server thread did not end"


def scrape(port: int, path: str = "/metrics", timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True when the server closes ``sock`` without an HTTP answer (a TLS alert may come first)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return b"HTTP/" not in got


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_server_serves_then_stops_and_frees_its_port(host: str) -> None:
    try:
        srv = MetricsHttpServer(host, 0, registry())
    except TcptraceError as exc:  # no IPv6 loopback on this machine
        pytest.skip(f"cannot listen on {host}: {exc}")
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{srv.port}/metrics", timeout=5) as resp:
        assert sample_value(resp.read().decode(), "tcptrace_events_total") == 7
        assert resp.headers["Connection"] == "close"
    assert srv.stop(), "the server thread did not end"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with pytest.raises(OSError), socket.socket(family) as s:
        s.settimeout(2)
        s.connect((host, srv.port))


def test_a_busy_port_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(TcptraceError, match="cannot listen on 127.0.0.1"):
            MetricsHttpServer("127.0.0.1", busy.getsockname()[1], registry())


def test_a_thousand_idle_connections_do_not_block_a_scrape(server: MetricsHttpServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
    try:
        for _ in range(5):
            assert sample_value(scrape(server.port), "tcptrace_events_total") == 7
        assert server.connections <= server.max_connections
        assert server.closed["evicted"] >= 1000 - server.max_connections
        # The rest time out: nothing is held open for ever.
        assert wait_until(lambda: server.connections == 0)
        assert server.closed["idle"] > 0
    finally:
        for s in idle:
            s.close()


def test_a_request_that_never_ends_is_cut_off(server: MetricsHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
        assert sample_value(scrape(server.port), "tcptrace_events_total") == 7
        assert closed_by_peer(slow)
    assert server.closed["idle"] == 1


def test_oversized_and_malformed_requests_are_refused(server: MetricsHttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as big:
        big.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000)
        big.settimeout(10)
        assert big.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", server.port)) as bad:
        bad.sendall(b"HELLO\r\n\r\n")
        bad.settimeout(10)
        assert bad.recv(100).startswith(b"HTTP/1.1 400 ")
    assert sample_value(scrape(server.port), "tcptrace_events_total") == 7


def test_methods(server: MetricsHttpServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("HEAD", "/metrics")
    head = conn.getresponse()
    assert head.status == 200 and int(head.headers["Content-Length"]) > 0 and head.read() == b""
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/metrics", body=b"x")
    assert conn.getresponse().status == 405
    conn.close()


def test_content_negotiation_and_gzip_are_prometheus_clients(server: MetricsHttpServer) -> None:
    import gzip

    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(resp.read()).decode()
    assert body.rstrip().endswith("# EOF") and "tcptrace_events_total 7.0" in body


def test_overload_gets_503_and_a_failing_collector_500() -> None:
    release = threading.Event()

    def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/fail":
            raise RuntimeError("collector failed")
        release.wait(30)
        start_response("200 OK", [])
        return [b"ok"]

    srv = MetricsHttpServer("127.0.0.1", 0, registry(), app=slow_app, limits=Limits(workers=1, max_queued=1))
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        for s in held:
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert wait_until(lambda: srv._working == 2)
        with socket.create_connection(("127.0.0.1", srv.port)) as third:
            third.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            third.settimeout(10)
            assert third.recv(100).startswith(b"HTTP/1.1 503 ")
        release.set()
        for s in held:
            s.settimeout(10)
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")
            s.close()
        with socket.create_connection(("127.0.0.1", srv.port)) as failing:
            failing.sendall(b"GET /fail HTTP/1.1\r\n\r\n")
            failing.settimeout(10)
            assert failing.recv(100).startswith(b"HTTP/1.1 500 ")
        assert srv.closed["overload"] == 1
    finally:
        release.set()
        assert srv.stop()


def test_what_the_server_dropped_is_exported(server: MetricsHttpServer) -> None:
    reg = registry()
    reg.register(ServerCollector(server))
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert closed_by_peer(idle)
    text = text_of(reg)
    assert sample_value(text, "tcptrace_metrics_connections_dropped_total", {"reason": "idle"}) == 1
    assert sample_value(text, "tcptrace_metrics_connections_dropped_total", {"reason": "evicted"}) == 0
    assert sample_value(text, "tcptrace_metrics_connections") == 0


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(tmp_path: Path) -> None:
    """The server in a process allowed 64 files, without the cap that keeps it below that:
    accept() fails with EMFILE, pending connections are evicted, scrapes are answered."""
    script = textwrap.dedent(
        """
        import resource, sys, time
        from tcptrace.export import httpserver
        from tcptrace.export.prometheus import AgentCollector, families, make_registry
        from tcptrace.model.agent import ExportState
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        httpserver.fd_limit = lambda: None
        c = AgentCollector()
        c.publish(families(ExportState(threshold_s=5, events_decoded=7)))
        srv = httpserver.MetricsHttpServer(
            "127.0.0.1", 0, make_registry(c, process_metrics=False),
            limits=httpserver.Limits(max_connections=10_000, request_timeout_s=30))
        print(srv.port, flush=True)
        sys.stdin.readline()
        print(srv.closed["evicted"], flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    idle: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        for _ in range(3):
            assert sample_value(scrape(port), "tcptrace_events_total") == 7
        child.stdin.write("\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) > 0
    finally:
        for s in idle:
            s.close()
        child.kill()
        child.wait()


# ---- TLS --------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both CA-signed."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))  # fmt: skip
    return d


def https_scrape(port: int, pki: Path, client_cert: bool) -> str:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx) as resp:
        return str(resp.read().decode())


def test_https(pki: Path) -> None:
    tls = TlsOptions(str(pki / "server.pem"), str(pki / "server.key"))
    srv = MetricsHttpServer("127.0.0.1", 0, registry(), tls=tls, limits=Limits(request_timeout_s=1.0))
    try:
        assert sample_value(https_scrape(srv.port, pki, client_cert=False), "tcptrace_events_total") == 7
        # Plain HTTP to the TLS port is not served; idle TLS connections time out.
        with socket.create_connection(("127.0.0.1", srv.port)) as plain:
            plain.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert closed_by_peer(plain)
        with socket.create_connection(("127.0.0.1", srv.port)) as idle:
            assert closed_by_peer(idle)
        assert srv.closed["tls"] == 1 and srv.closed["idle"] == 1
    finally:
        assert srv.stop()


def test_client_certificates(pki: Path) -> None:
    tls = TlsOptions(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    srv = MetricsHttpServer("127.0.0.1", 0, registry(), tls=tls)
    try:
        assert sample_value(https_scrape(srv.port, pki, client_cert=True), "tcptrace_events_total") == 7
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            https_scrape(srv.port, pki, client_cert=False)
    finally:
        assert srv.stop()


def test_unreadable_tls_files_are_one_line(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(TcptraceError, match="cannot load the TLS certificate"):
        TlsOptions(str(tmp_path / "missing.pem"), str(pki / "server.key")).context()
    with pytest.raises(TcptraceError, match="cannot load the client CA"):
        TlsOptions(str(pki / "server.pem"), str(pki / "server.key"), str(tmp_path / "nope.pem")).context()

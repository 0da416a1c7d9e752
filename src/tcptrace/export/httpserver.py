"""The agent's /metrics endpoint: an HTTP server that idle, slow or too many clients cannot blind.

prometheus_client's ``start_http_server`` serves each connection in a thread of its own,
with no timeout, behind a listen backlog of 5: a thousand idle connections to the port
block every scrape and burn a core. Here one thread owns every socket, non-blocking, in a
selector, and nothing a client does can hold more than a bounded share of the server:

- a listen backlog of ``BACKLOG``; at most ``max_connections`` open at once: past that, the
  oldest connection that has not sent a whole request yet is closed (a scraper sends its
  request at once, so an idle client is what goes);
- a whole request (its headers, at most ``MAX_REQUEST`` bytes; a TLS handshake first) must
  arrive within ``request_timeout_s`` of the accept, or the connection is closed;
- the response is built by a pool of ``workers`` threads with prometheus_client's WSGI app
  (content negotiation, gzip, ``name[]`` filters), with at most ``max_queued`` requests
  waiting for one (past that: 503);
- the response is written non-blocking within ``write_timeout_s``, then the connection is
  closed (``Connection: close``: no keep-alive to hold a connection open);
- when the process runs out of file descriptors, accepting pauses instead of spinning
  (the backlog keeps the rest waiting).

TLS (``TlsOptions``): the certificate and key, and optionally a client CA: then only
clients presenting a certificate it signed are served (what prometheus_client's
``start_http_server`` calls ``certfile``, ``keyfile`` and ``client_cafile`` with
``client_auth_required``).

What the server dropped, and why, is counted (``closed``) and exported by the agent.
"""

from __future__ import annotations

import errno
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tcptrace.errors import TcptraceError

BACKLOG = 1024
MAX_REQUEST = 8192
FD_PAUSE_S = 0.1
TICK_S = 0.1  # deadlines are checked this often: a timeout is late by at most this much
RESERVED_FDS = 256  # of the process's limit, kept for the agent itself (maps, /proc reads)
CLOSE_REASONS = ("idle", "evicted", "overload", "bad_request", "tls", "write_timeout", "error")

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class TlsOptions:
    """A certificate and its key; with ``client_cafile``, clients must present a
    certificate signed by that CA."""

    certfile: str
    keyfile: str
    client_cafile: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server's TLS context (TLS 1.2 or later); TcptraceError when a file does not load."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise TcptraceError(
                f"cannot load the TLS certificate {self.certfile} or its key {self.keyfile}: {_why(exc)}"
            ) from None
        if self.client_cafile is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_cafile)
            except (OSError, ssl.SSLError) as exc:
                raise TcptraceError(f"cannot load the client CA {self.client_cafile}: {_why(exc)}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _why(exc: OSError) -> str:
    """ssl.SSLError is an OSError whose strerror is None; its reason says what failed."""
    return str(exc.strerror or getattr(exc, "reason", None) or exc)


@dataclass(frozen=True)
class Limits:
    """How much of the server any one client, or all of them, can take."""

    max_connections: int = 512
    request_timeout_s: float = 5.0
    write_timeout_s: float = 10.0
    workers: int = 2
    max_queued: int = 16


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    state: str = "read"  # handshake, read, work, write
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None

    @property
    def pending(self) -> bool:
        """Still waiting for the client's request (what may be evicted)."""
        return self.state in ("handshake", "read")


def http_response(status: str, headers: list[tuple[str, str]], body: bytes, head: bool = False) -> bytes:
    """One HTTP/1.1 response that closes the connection.

    >>> http_response("200 OK", [("Content-Type", "text/plain")], b"hi").split(b"\\r\\n")
    [b'HTTP/1.1 200 OK', b'Content-Type: text/plain', b'Content-Length: 2', b'Connection: close', b'', b'hi']
    """
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def _error(status: str) -> bytes:
    return http_response(status, [("Content-Type", "text/plain; charset=utf-8")], f"{status}\n".encode())


def parse_request(raw: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, target, headers by lower-case name) of a request's head; None when malformed.

    >>> parse_request(b"GET /metrics?name[]=x HTTP/1.1\\r\\nAccept: text/plain\\r\\n\\r\\n")
    ('GET', '/metrics?name[]=x', {'accept': 'text/plain'})
    >>> parse_request(b"garbage\\r\\n\\r\\n") is None
    True
    """
    try:
        head = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def respond(app: App, raw: bytes) -> bytes:
    """The whole response to one request's head, by prometheus_client's WSGI app."""
    request = parse_request(raw)
    if request is None:
        return _error("400 Bad Request")
    method, target, headers = request
    if method not in ("GET", "HEAD"):
        return http_response("405 Method Not Allowed", [("Allow", "GET, HEAD")], b"")
    url = urlsplit(target)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query,
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    for name in ("accept", "accept-encoding"):
        if name in headers:
            environ["HTTP_" + name.upper().replace("-", "_")] = headers[name]
    started: list[Any] = []

    def start_response(status: str, response_headers: list[tuple[str, str]], *_: Any) -> None:
        started[:] = [status, response_headers]

    body = b"".join(app(environ, start_response))
    status, response_headers = started
    return http_response(status, list(response_headers), body, head=method == "HEAD")


class MetricsHttpServer:
    """Serves ``registry`` on (host, port) from a thread of its own until ``stop()``."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        tls: TlsOptions | None = None,
        limits: Limits = Limits(),
        app: App | None = None,
    ) -> None:
        self.limits = limits
        nofile = fd_limit()
        self.max_connections = limits.max_connections
        if nofile is not None:
            self.max_connections = max(8, min(limits.max_connections, nofile - RESERVED_FDS))
        self._app: App = app or make_wsgi_app(registry)
        self._tls = tls.context() if tls is not None else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host, port), family=family, backlog=BACKLOG)
        except OSError as exc:
            raise TcptraceError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._listener.setblocking(False)
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        """Connections closed before a response was written, by reason."""
        self.served = 0
        self._conns: dict[socket.socket, _Conn] = {}
        self._done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = True
        self._resume_at = 0.0
        self._working = 0
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="tcptrace-metrics")
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="tcptrace-metrics-server", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop serving and close every socket; True when the server's thread ended."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout_s)
        ended = not self._thread.is_alive()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if ended:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
        return ended

    # ---- the loop -------------------------------------------------------------------------

    def _serve(self) -> None:
        next_check = 0.0
        while not self._stopping:
            for key, _mask in self._sel.select(TICK_S):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wake()
                elif isinstance(key.data, _Conn) and key.data.sock in self._conns:
                    self._io(key.data)
            now = time.monotonic()
            if now >= next_check:  # at most every TICK_S, however busy
                next_check = now + TICK_S
                self._expire(now)
                if not self._accepting and now >= self._resume_at:
                    self._sel.register(self._listener, selectors.EVENT_READ, "listen")
                    self._accepting = True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake is pending anyway) or closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                return
            self._working -= 1
            if conn.sock not in self._conns:
                continue
            conn.state, conn.out = "write", memoryview(data)
            conn.deadline = time.monotonic() + self.limits.write_timeout_s
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._io(conn)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._evict_oldest():
                        self._pause_accepting()
                        return
                    continue
                return  # ECONNABORTED and the like: that client is gone
            if len(self._conns) >= self.max_connections and not self._evict_oldest():
                self.closed["overload"] += 1
                sock.close()
                continue
            self._add(sock)

    def _pause_accepting(self) -> None:
        self._sel.unregister(self._listener)
        self._accepting = False
        self._resume_at = time.monotonic() + FD_PAUSE_S

    def _evict_oldest(self) -> bool:
        for conn in self._conns.values():  # in order of accept
            if conn.pending:
                self.closed["evicted"] += 1
                self._close(conn)
                return True
        return False

    def _add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        deadline = time.monotonic() + self.limits.request_timeout_s
        conn = _Conn(sock, deadline)
        if self._tls is not None:
            try:
                conn.sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                self.closed["tls"] += 1
                sock.close()
                return
            conn.state = "handshake"
        self._conns[conn.sock] = conn
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.state == "handshake":
            self._io(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.state != "work" and c.deadline <= now]:
            self.closed["write_timeout" if conn.state == "write" else "idle"] += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass

    # ---- one connection --------------------------------------------------------------------

    def _io(self, conn: _Conn) -> None:
        try:
            if conn.state == "handshake":
                self._handshake(conn)
            if conn.state == "read":
                self._read(conn)
            elif conn.state == "write":
                self._write(conn)
        except ssl.SSLWantWriteError:
            self._wait(conn, write=True)
        except ssl.SSLWantReadError:
            self._wait(conn, write=False)
        except BlockingIOError:
            self._wait(conn, write=conn.state == "write")
        except ssl.SSLError:
            self.closed["tls"] += 1
            self._close(conn)
        except OSError:  # reset by the peer, and the like
            self.closed["error"] += 1
            self._close(conn)

    def _wait(self, conn: _Conn, write: bool) -> None:
        if conn.sock in self._conns:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ, conn)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        conn.sock.do_handshake()  # SSLWantReadError / SSLWantWriteError: _io waits
        conn.state = "read"
        self._wait(conn, write=False)

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                chunk = conn.sock.recv(4096)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not chunk:  # the client went away before asking anything
                self._close(conn)
                return
            conn.inbuf += chunk
            if len(conn.inbuf) > MAX_REQUEST:
                break
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0 and len(conn.inbuf) <= MAX_REQUEST:
            return
        self._sel.unregister(conn.sock)
        if end < 0:
            self.closed["bad_request"] += 1
            self._reply(conn, _error("431 Request Header Fields Too Large"))
            return
        if self._working >= self.limits.workers + self.limits.max_queued:
            self.closed["overload"] += 1
            self._reply(conn, _error("503 Service Unavailable"))
            return
        conn.state = "work"
        self._working += 1
        head = bytes(conn.inbuf[:end])
        self._pool.submit(self._build, conn, head)

    def _build(self, conn: _Conn, head: bytes) -> None:
        """In a worker: the response, handed back to the loop."""
        try:
            data = respond(self._app, head)
        except Exception:  # a collector failed: the scrape gets a 500, the server goes on
            data = _error("500 Internal Server Error")
        self._done.put((conn, data))
        self._wake()

    def _reply(self, conn: _Conn, data: bytes) -> None:
        conn.state, conn.out = "write", memoryview(data)
        conn.deadline = time.monotonic() + self.limits.write_timeout_s
        self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._io(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        while conn.out:
            n = conn.sock.send(conn.out)  # BlockingIOError and the like: _io waits
            conn.out = conn.out[n:]
        self.served += 1
        if not isinstance(conn.sock, ssl.SSLSocket):
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._close(conn)


def fd_limit() -> int | None:
    """The soft limit on open files of this process (what bounds the connections too)."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


class ServerCollector(Collector):
    """What the endpoint itself went through: connections open now, and those it closed
    before answering, by reason (an idle or flooding client shows here)."""

    def __init__(self, server: MetricsHttpServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        dropped = CounterMetricFamily(
            "tcptrace_metrics_connections_dropped",
            "Connections to the metrics endpoint closed without a response, by reason: idle (no "
            "whole request in time), evicted (too many open), overload, bad_request, tls, "
            "write_timeout, error.",
            labels=["reason"],
        )
        for reason in CLOSE_REASONS:
            dropped.add_metric([reason], self.server.closed[reason])
        return [
            GaugeMetricFamily(
                "tcptrace_metrics_connections",
                "Connections to the metrics endpoint open now.",
                value=self.server.connections,
            ),
            dropped,
        ]

    def describe(self) -> Iterable[Metric]:
        return []


__all__ = ["Limits", "MetricsHttpServer", "ServerCollector", "TlsOptions", "fd_limit", "respond"]

"""Loopback TCP scenarios with known state sequences, for tests and for recording test data.

Each scenario runs one connection on ``port`` and returns the client's and the server's
local ports, so a test can pick each side's transitions out of a stream. Pauses let the
ACK of a FIN arrive before the other side acts, which makes the sequences deterministic
(no FIN piggybacked on an ACK).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

PAUSE = 0.05


@dataclass(frozen=True)
class Conn:
    client_port: int
    server_port: int
    family: int


def _pair(port: int, family: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    client = socket.create_connection((host, port))
    server, _ = listener.accept()
    return listener, client, server


def orderly_close(port: int, family: int = socket.AF_INET, *, first: str = "client") -> Conn:
    """One connection closed by ``first`` ("client" or "server"); the other side closes once
    it has read EOF. The first closer ends in TIME_WAIT, the other passes CLOSE_WAIT."""
    listener, client, server = _pair(port, family)
    conn = Conn(client.getsockname()[1], port, family)
    closer, peer = (client, server) if first == "client" else (server, client)
    closer.close()
    time.sleep(PAUSE)
    assert peer.recv(1) == b""
    peer.close()
    time.sleep(PAUSE)
    listener.close()
    return conn


def client_closes_first(port: int, family: int = socket.AF_INET) -> Conn:
    """Client: ... FIN_WAIT1, FIN_WAIT2, CLOSE (timewait). Server: CLOSE_WAIT, LAST_ACK, CLOSE."""
    return orderly_close(port, family, first="client")


def server_closes_first(port: int, family: int = socket.AF_INET) -> Conn:
    return orderly_close(port, family, first="server")


def client_resets(port: int, family: int = socket.AF_INET) -> Conn:
    """SO_LINGER {1, 0}: close() sends a RST; both sides go straight to CLOSE."""
    listener, client, server = _pair(port, family)
    conn = Conn(client.getsockname()[1], port, family)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    time.sleep(PAUSE)
    server.close()
    listener.close()
    return conn


CLIENT_CLOSES_FIRST_CLIENT = [
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
]
CLIENT_CLOSES_FIRST_SERVER = [
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
]
SERVER_CLOSES_FIRST_CLIENT = [
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
]
SERVER_CLOSES_FIRST_SERVER = [
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
]
RESET_CLIENT = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "CLOSE")]
RESET_SERVER = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "CLOSE")]
LISTENER = [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]

"""Refuse every non-loopback connection from Python code, and log each attempt (tests/vllm: "offline" proven).

Put this folder first on PYTHONPATH and set PRESTAGE_NETGUARD_LOG=FILE: every process started with that
environment (vLLM's workers too) appends one line per refused attempt: `<kind> <host> <port>`.
"""

import ipaddress
import os
import socket

_LOG = os.environ.get("PRESTAGE_NETGUARD_LOG")
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(sock, address):
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(f"{kind} {address[0]} {address[1] if len(address) > 1 else ''}\n")
    raise ConnectionRefusedError(f"netguard: non-loopback connection to {address!r} refused")


def connect(self, address):
    if not _loopback(address):
        _refuse(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    if not _loopback(address):
        _refuse(self, address)
    return _connect_ex(self, address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex

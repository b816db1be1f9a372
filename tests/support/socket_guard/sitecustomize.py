"""A socket guard for a subprocess: put this folder first on PYTHONPATH and Python imports it at start-up.

Every connection attempt on an Internet socket (IPv4 or IPv6, loopback included: on the air-gapped side not even
a local hub may be asked) is refused with ConnectionRefusedError and recorded, one JSON line per attempt, in the
file PRESTAGE_SOCKET_GUARD_LOG names (each guarded process's pid goes
to that name + ".loaded"); so is every name lookup (getaddrinfo) of a host that is not a literal
address. Unix sockets are left alone. Listening (bind/accept, as `prestage serve` does) is not a connection.
Used by tests/test_no_network.py; it never changes anything without PRESTAGE_SOCKET_GUARD_LOG set.
"""

import json
import os
import socket
import traceback

_LOG = os.environ.get("PRESTAGE_SOCKET_GUARD_LOG")


def _record(kind, target):
    with open(_LOG, "a") as fh:
        where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[-6:-2]]
        fh.write(json.dumps({"pid": os.getpid(), "kind": kind, "target": repr(target), "stack": where}) + "\n")


if _LOG:
    with open(_LOG + ".loaded", "a") as _fh:  # proof the guard was active in this process
        _fh.write(f"{os.getpid()}\n")
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    _INET = (socket.AF_INET, socket.AF_INET6)

    def connect(self, address):
        if self.family in _INET:
            _record("connect", address)
            raise ConnectionRefusedError(111, f"socket guard: no network on this side (connect to {address!r})")
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in _INET:
            _record("connect_ex", address)
            return 111
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        literal = host is None
        if not literal:
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in str(host) else socket.AF_INET, str(host))
                literal = True
            except (OSError, ValueError):
                literal = False
        if not literal:
            _record("getaddrinfo", host)
            raise socket.gaierror(socket.EAI_NONAME, f"socket guard: no name lookups on this side ({host!r})")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo

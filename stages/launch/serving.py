"""`prestage serve`'s work: check the serve extra, take the port, load the model once, run uvicorn on it.

    bind(host, port) -> socket        a port in use is a one-line ResourceError before anything is printed
    serve(app, sock, quiet, loop)     uvicorn on a thread of its own, the engine loop on this one

The socket is bound before the model loads, so `--port 0` announces the port the system picked, and the
"serving on" line is printed only once the port is really ours.
"""

from __future__ import annotations

import errno
import socket

from prestage.stages.errors import ResourceError, UnsupportedError, UsageError

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def check_serve_extra() -> None:
    """UnsupportedError naming the install command when a module of the `serve` extra is missing."""
    import importlib

    missing = []
    for name in SERVE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UnsupportedError(
            f"serve needs {', '.join(missing)} (the serve extra), which is not installed: pip install 'prestage[serve]'"
        )


def check_serve_params(params: dict) -> None:
    from prestage.stages.configure.dtype import normalize_requested

    normalize_requested(params.get("dtype"))  # vLLM's names, as launch reads them: half, float, float16, ...
    mml = params.get("max_model_len")
    if mml is not None and int(mml) < 2:
        raise UsageError(f"--max-model-len {mml}: must be at least 2 (one prompt token and one generated)")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ResourceError(
                f"--port {port}: address {host}:{port} is already in use; pick another --port (0: any free one)"
            ) from None
        raise ResourceError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, quiet: bool, loop=None) -> None:
    """Run uvicorn on the bound socket; one log line per finished request on stderr unless quiet. With `loop`
    (an EngineLoop.on_this_thread), uvicorn runs on a thread of its own and the engine loop on this one, the
    thread that loaded the model (engine_loop.py says why); SIGINT / SIGTERM stop both gracefully."""
    import logging
    import signal
    import sys
    import threading

    import uvicorn

    log = logging.getLogger("prestage.serve")
    if not quiet and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("INFO:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if loop is None:
        server.run(sockets=[sock])
        return

    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # raised again on this thread, once the loop has stopped
            failed.append(e)
        finally:
            loop.stop()

    def shut_down(signum, frame) -> None:
        server.should_exit = True  # uvicorn finishes what it is answering, then its thread stops the loop
        loop.abort_all()  # and what it is answering ends now: running requests finish as "abort"

    previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="prestage-http", daemon=True)
    thread.start()
    try:
        loop.run_here()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]

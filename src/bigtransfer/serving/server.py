"""Running the app: bind the socket (port 0 picks a free one), serve, and stop cleanly on SIGTERM.

On SIGTERM uvicorn stops accepting connections, lets the requests in flight finish (up to
--grace seconds), then the app stops its batcher; `serve` returns normally, so the exit code is 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import warnings

from ..errors import BigTransferError, BigTransferWarning
from ..models import checkpoint
from ..models.factory import resolve_weights
from .app import ServingState, create_app
from .options import ServeOptions, check_options

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(options: ServeOptions) -> None:
    """Serve the model until SIGTERM (finish what is in flight, return) or Ctrl-C."""
    import uvicorn

    check_options(options)
    checkpoint.summarize(resolve_weights(options.model))  # a wrong path fails here, before we listen
    sock = bind(options.host, options.port)
    if options.host not in LOOPBACK and options.api_key_file is None:
        warnings.warn(f"--host {options.host}: anyone who can reach this address can use the model "
                      "(--api-key-file requires a key)", BigTransferWarning, stacklevel=2)
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def failed(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(options, on_ready=announce_ready, on_failure=failed)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="info" if options.access_log else "warning", access_log=options.access_log,
        timeout_graceful_shutdown=max(1, round(options.grace_s)), server_header=False, lifespan="on"))
    print(f"bigtransfer serve: listening on {url_of(sock)} (loading {options.model}; GET /health says when "
          "it is ready)", flush=True)
    with _sigterm_returns() as terminated:
        server.run(sockets=[sock])
    if failures:
        raise failures[0]
    print("bigtransfer serve: stopped" + (" on SIGTERM, after answering the requests in flight" if terminated
                                          else ""), flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening: uvicorn does that once the app has started)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise BigTransferError(f"--host {host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise BigTransferError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_ready(state: ServingState) -> None:
    p = state.predictor
    head = f"{len(p.class_names)} classes" if p.class_names is not None else "no head (embed only)"
    print(f"bigtransfer serve: ready: {p.name} ({head}, {p.resolution} px, {p.device}, {p.describe()}, "
          f"fingerprint {p.fingerprint or 'none'}); warmed up in {state.warmup_s:.2f} s", flush=True)


@contextlib.contextmanager
def _sigterm_returns():
    """uvicorn re-raises the SIGTERM it handled once it has shut down; note it and end `serve` normally."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)

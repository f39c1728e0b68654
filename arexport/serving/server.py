"""Run the HTTP app with uvicorn: in the foreground (`arexport serve`) or in a background thread
(tests, load tests, embedding next to other work)."""

from __future__ import annotations

import logging
import threading
import time

from arexport.errors import ArexportError


def _uvicorn():
    try:
        import uvicorn
    except ImportError as e:
        raise ArexportError(f"arexport serve needs uvicorn (pip install 'arexport[serve]'): {e}") from None
    return uvicorn


class RedactQuery(logging.Filter):
    """Access-log lines show a path without its query string (which may carry a token or a prompt)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = args[:2] + (args[2].split("?", 1)[0] + "?<redacted>",) + args[3:]
        return True


def redact_access_log() -> None:
    """Install RedactQuery on uvicorn's access logger (once)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())


HEADER_TIMEOUT_S = 10.0  # a connection that has not sent a whole request head within this is closed


def header_timeout_protocol():
    """uvicorn's HTTP protocol (httptools' C parser where it is installed, else the pure-Python h11:
    under a burst the parser runs on the event loop that also answers refusals), plus: a connection
    that does not start a request (its whole head received) within HEADER_TIMEOUT_S of opening, or of
    its previous response, is closed — a client sending headers byte by byte cannot hold a connection
    for long (uvicorn times out only idle keep-alive connections)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional (uvicorn[standard])
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderTimeoutProtocol(Base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self):
            self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout, self.cycle)

        def _header_timeout(self, cycle):
            if self.cycle is cycle and self.transport is not None and not self.transport.is_closing():
                self.transport.close()  # no new request since the timer was armed

    return HeaderTimeoutProtocol


MAX_CONNECTIONS = 1000  # connections + tasks; beyond, uvicorn answers 503 at once
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MIN_DRAIN_S = 1.0  # the socket stays open (answering 503) at least this long after SIGTERM
MAX_DRAIN_S = 60.0


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", service=None) -> None:
    """Blocking. The first SIGINT/SIGTERM closes `service`: new requests get 503 and /healthz says
    "closing" while queued and in-flight work finishes (the socket stays open meanwhile, at least
    MIN_DRAIN_S so clients and load balancers see the 503s); then uvicorn stops. A second SIGINT
    forces the exit."""
    uvicorn = _uvicorn()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60,
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S, http=header_timeout_protocol())
    redact_access_log()  # after Config, which (re)configures uvicorn's loggers
    (_DrainingServer(config, service) if service is not None else uvicorn.Server(config)).run()


def _draining_server_class():
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):
        def __init__(self, config, service):
            super().__init__(config)
            self.service = service
            self.draining = False

        def handle_exit(self, sig, frame):
            if self.draining or self.should_exit:
                return super().handle_exit(sig, frame)
            self.draining = True
            self._captured_signals.append(sig)  # uvicorn re-raises it once it has stopped
            self.service.close(drain=True, timeout=0)  # non-blocking: stop taking requests, wake the worker
            threading.Thread(target=self._exit_when_drained, daemon=True).start()

        def _exit_when_drained(self):
            t0 = time.monotonic()
            self.service.wait_closed(MAX_DRAIN_S)
            time.sleep(max(0.0, MIN_DRAIN_S - (time.monotonic() - t0)))
            self.should_exit = True

    return DrainingServer


def _DrainingServer(config, service):
    return _draining_server_class()(config, service)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves on 127.0.0.1 (a free port) until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        uvicorn = _uvicorn()
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE_S,
                                     http=header_timeout_protocol())
        redact_access_log()
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

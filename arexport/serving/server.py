"""Run the HTTP app with uvicorn: in the foreground (`arexport serve`) or in a background thread
(tests, load tests, embedding next to other work)."""

from __future__ import annotations

import threading
import time

from arexport.errors import ArexportError


def _uvicorn():
    try:
        import uvicorn
    except ImportError as e:
        raise ArexportError(f"arexport serve needs uvicorn (pip install 'arexport[serve]'): {e}") from None
    return uvicorn


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Blocking; SIGINT/SIGTERM stop accepting, finish in-flight requests, then drain the service."""
    uvicorn = _uvicorn()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves on 127.0.0.1 (a free port) until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        uvicorn = _uvicorn()
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
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

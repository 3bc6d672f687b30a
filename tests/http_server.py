"""A real HTTP file server on 127.0.0.1, run in a thread, that misbehaves on request (for downloader tests).

    with FileServer({"/a.txt": Route(b"hello", cut_after=2)}) as server:
        url = server.url("/a.txt")
        ...
        server.requests  # [(path, {header: value}), ...] in arrival order
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes
    ranges: bool = True  # honour `Range: bytes=N-` with 206; False: always 200 with the whole body
    fail_first: int = 0  # answer the first N GETs with `fail_status`
    fail_status: int = 503
    cut_after: int | None = None  # close the socket after this many body bytes ...
    cut_times: int = 1  # ... on this many GETs (after any failures)
    stall: float = 0.0  # on the first GET, wait this long after the headers before sending the body
    gets: int = 0  # GETs served so far


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FileServer:
    """Serve `routes` (path -> Route) on an ephemeral port; unknown paths get 404."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def range_headers(self, path: str) -> list[str | None]:
        """The Range header of each GET of `path`, in order (None where there was none)."""
        return [headers.get("Range") for p, headers in self.requests if p == path]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            with server._lock:
                server.requests.append((self.path, dict(self.headers.items())))
                route = server.routes.get(self.path)
                if route is not None:
                    route.gets += 1
                    n = route.gets
            if route is None:
                self._reply(404, b"not found")
                return
            if n <= route.fail_first:
                self._reply(route.fail_status, b"try later", {"Retry-After": "0"})
                return
            body, size, start = route.body, len(route.body), 0
            m = _RANGE.match(self.headers.get("Range", ""))
            if route.ranges and m:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size:
                    self._reply(416, b"", {"Content-Range": f"bytes */{size}"})
                    return
                body = route.body[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
            self.end_headers()
            try:
                if route.stall and n == route.fail_first + 1:
                    self.wfile.flush()
                    time.sleep(route.stall)
                if route.cut_after is not None and n <= route.fail_first + route.cut_times:
                    self.wfile.write(body[: route.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)
            except OSError:  # the client hung up (e.g. after its read timeout)
                self.close_connection = True

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler

"""Serve one page on the local machine with the standard library's HTTP server (no network beyond 127.0.0.1)."""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCALHOST = "127.0.0.1"


def make_server(page: str, *, port: int = 0, host: str = LOCALHOST) -> ThreadingHTTPServer:
    """An HTTP server, bound but not yet serving, that answers ``GET /`` with ``page``.

    Args:
        page: the HTML document.
        port: the TCP port; 0 picks a free one (read it from ``server.server_address[1]``).
        host: the address to bind; the default keeps the page on this machine.

    Raises:
        OSError: when the port is taken or cannot be bound.

    Call ``server.serve_forever()`` to answer requests and ``server.shutdown()`` (from another thread) to
    stop; ``server.server_close()`` releases the port.
    """
    body = page.encode("utf-8")

    class PageHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/", "/index.html"):
                self.send_error(HTTPStatus.NOT_FOUND, "only / is served")
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet: the command prints the URL once
            return

    return ThreadingHTTPServer((host, port), PageHandler)

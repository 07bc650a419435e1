"""A local image host on 127.0.0.1 with misbehaving routes, for the fetch cases.

Routes: `/ok.png` (a good image), `/slow.png` (trickles a byte every half second),
`/hang.png` (sends nothing), `/huge.png` (streams past any cap, no Content-Length),
`/declared-huge.png` (claims 1 GiB), `/page.html` (a web page), `/gzip.png`
(Content-Encoding: gzip), `/missing.png` (404), `/redirect?to=URL` (302 to URL) and
`/loop` (redirects to itself). Every response is bounded: slow and hanging routes stop
after `stall_s`, so a test that goes wrong still ends.

Threads: one ThreadingHTTPServer thread, one more per connection.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from urllib.parse import parse_qs, urlsplit


class ImageHost:
    def __init__(self, png: bytes, stall_s: float = 6.0) -> None:
        self.png = png
        self.stall_s = stall_s
        self.hosts_seen: list[str] = []  # Host headers, in arrival order
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                host.hosts_seen.append(self.headers.get("Host", ""))
                host.route(self)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> ImageHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def route(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        query = parse_qs(urlsplit(handler.path).query)
        try:
            if path == "/ok.png":
                self._send(handler, 200, self.png, "image/png")
            elif path == "/slow.png":
                self._headers(handler, 200, "image/png", len(self.png))
                deadline = time.monotonic() + self.stall_s
                for byte in self.png:
                    if time.monotonic() > deadline:
                        break
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(0.5)
            elif path == "/hang.png":
                time.sleep(self.stall_s)
            elif path == "/huge.png":
                handler.send_response(200)
                handler.send_header("Content-Type", "image/png")
                handler.end_headers()  # no Content-Length: the body ends when the socket does
                chunk = b"\0" * 65536
                for _ in range(4096):  # up to 256 MiB, unless the client hangs up first
                    handler.wfile.write(chunk)
            elif path == "/declared-huge.png":
                self._headers(handler, 200, "image/png", 2**30)
                handler.wfile.write(self.png)
            elif path == "/page.html":
                self._send(handler, 200, b"<html><body>not an image</body></html>", "text/html")
            elif path == "/gzip.png":
                body = gzip.compress(self.png)
                handler.send_response(200)
                handler.send_header("Content-Type", "image/png")
                handler.send_header("Content-Encoding", "gzip")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
            elif path == "/redirect":
                self._redirect(handler, query["to"][0])
            elif path == "/loop":
                self._redirect(handler, "/loop")
            else:
                self._send(handler, 404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    @staticmethod
    def _headers(handler, status: int, content_type: str, length: int) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()

    def _send(self, handler, status: int, body: bytes, content_type: str) -> None:
        self._headers(handler, status, content_type, len(body))
        handler.wfile.write(body)

    @staticmethod
    def _redirect(handler, location: str) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

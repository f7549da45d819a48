"""A local HTTP server for download tests: real sockets on 127.0.0.1, an ephemeral port.

Routes (NAME is any token, so every URL in a test can be distinct):

    /img/NAME.jpg?w=W&h=H     a JPEG of W x H pixels (default 64 x 48), colour derived from NAME
    /img/NAME.png?w=W&h=H     the same as PNG (RGBA with a transparent corner when ?alpha=1)
    /slow/NAME.jpg?s=S        waits S seconds (default 4) before answering with a JPEG
    /html/NAME.jpg            200 with a text/html body: an image-looking URL that is not an image
    /broken/NAME.jpg          200 image/jpeg whose body is a truncated, undecodable JPEG
    /error/NAME.jpg           500
    /noai/NAME.jpg            a JPEG sent with `X-Robots-Tag: noai`
    anything else             404

Usage::

    with ImageServer() as srv:
        url = srv.url("/img/a.jpg?w=1024&h=768")
        ...
        srv.hits["/img/a.jpg"]   # how many requests that path received

Slow handlers wait on an event that `stop()` sets, so shutting down never waits for them.
"""

from __future__ import annotations

import collections
import hashlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

HTML_BODY = b"<!doctype html><html><head><title>Not found</title></head><body>This is a page, not an image.</body></html>"


def make_image(name: str, width: int, height: int, fmt: str = "JPEG", *, alpha: bool = False) -> bytes:
    """A deterministic image: a colour from NAME with a diagonal gradient, so it survives JPEG round trips."""
    seed = hashlib.sha256(name.encode()).digest()
    base = tuple(int(b) for b in seed[:3])
    mode = "RGBA" if alpha else "RGB"
    img = Image.new(mode, (width, height), base + ((255,) if alpha else ()))
    # A cheap gradient band: a few filled rectangles, enough to make images differ visibly.
    step = max(1, width // 8)
    for i in range(0, width, step):
        shade = tuple((c + 24 * (i // step)) % 256 for c in base) + ((255,) if alpha else ())
        img.paste(shade, (i, 0, min(width, i + step), max(1, height // 2)))
    if alpha:
        img.paste((0, 0, 0, 0), (0, 0, max(1, width // 4), max(1, height // 4)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _image(self, name: str, ext: str, query: dict) -> tuple[bytes, str]:
        w = int(query.get("w", ["64"])[0])
        h = int(query.get("h", ["48"])[0])
        if ext == "png":
            return make_image(name, w, h, "PNG", alpha=query.get("alpha", ["0"])[0] == "1"), "image/png"
        return make_image(name, w, h, "JPEG"), "image/jpeg"

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.count(parts.path)
        segs = parts.path.strip("/").split("/")
        if len(segs) != 2 or "." not in segs[1]:
            return self._send(404, b"not found", "text/plain")
        route, (name, _, ext) = segs[0], segs[1].rpartition(".")
        ext = ext.lower()
        if route == "img" and ext in ("jpg", "jpeg", "png"):
            body, ctype = self._image(name, ext, query)
            return self._send(200, body, ctype)
        if route == "slow":
            delay = float(query.get("s", ["4"])[0])
            if self.server.stopping.wait(delay):
                return  # server is shutting down: drop the connection
            body, ctype = self._image(name, "jpg", query)
            return self._send(200, body, ctype)
        if route == "html":
            return self._send(200, HTML_BODY, "text/html; charset=utf-8")
        if route == "broken":
            body = make_image(name, 64, 48, "JPEG")
            return self._send(200, body[: len(body) // 8], "image/jpeg")
        if route == "error":
            return self._send(500, b"internal error", "text/plain")
        if route == "noai":
            body, ctype = self._image(name, "jpg", query)
            return self._send(200, body, ctype, {"X-Robots-Tag": "noai"})
        return self._send(404, b"not found", "text/plain")

    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr):
        super().__init__(addr, _Handler)
        self.stopping = threading.Event()
        self.hits: collections.Counter[str] = collections.Counter()
        self._hits_lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._hits_lock:
            self.hits[path] += 1


class ImageServer:
    """Serve test images on http://127.0.0.1:PORT until `stop()` (or the end of a `with` block)."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0))
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-image-server", daemon=True)

    @property
    def hits(self) -> collections.Counter:
        return self._server.hits

    def url(self, path: str) -> str:
        return self.base + ("" if path.startswith("/") else "/") + path

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # handy for poking at it by hand: python tests/httpserver.py
    with ImageServer() as srv:
        print(srv.base, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

"""Hostile peers on loopback, as threads: a listener that records every byte it is sent
(what a proxy named by HTTP_PROXY would get), and an origin that echoes the credentials
of each request back in its answer.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


class RecordingListener:
    """Accepts connections on a free loopback port, records what arrives, answers 502."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._received: list[bytes] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._record, args=(connection,), daemon=True).start()

    def _record(self, connection: socket.socket) -> None:
        connection.settimeout(2)
        data = b""
        with connection:
            try:
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                connection.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                while chunk := connection.recv(65536):
                    data += chunk
            except OSError:
                pass
        with self._lock:
            self._received.append(data)

    def received(self) -> bytes:
        """Every byte received so far, on every connection."""
        with self._lock:
            return b"".join(self._received)

    def environment(self) -> dict[str, str]:
        """Proxy variables, in both spellings, naming this listener for every scheme."""
        env = dict.fromkeys(PROXY_VARIABLES, self.url)
        env.update(NO_PROXY="", no_proxy="")
        return env

    def close(self) -> None:
        """Stop accepting."""
        self._server.close()


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads what it needs from `seen`."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        authorization = self.headers.get("Authorization", "")
        self.server.seen.append(authorization)
        echo = json.dumps({name: value for name, value in self.headers.items()}).encode()
        mode = parse_qs(urlsplit(self.path).query).get("echo", ["headers"])[0]
        headers = [("Content-Type", "application/json"), ("X-Echo-Authorization", authorization)]
        status, body, chunks = 200, echo, None
        if mode == "www-authenticate":
            status = 401
            headers.append(("WWW-Authenticate", authorization))
            body = json.dumps({"errors": [f"key not accepted: {authorization}"]}).encode()
        elif mode == "gzip":
            headers.append(("Content-Encoding", "gzip"))
            body = gzip.compress(echo)
        elif mode == "markers":
            headers += [
                ("X-Publer-Proxy-Error", "scope_denied"),
                ("X-Publer-Proxy-Hint", "forged by the origin"),
                ("X-Publer-Proxy-Anything", "forged by the origin"),
            ]
        elif mode == "chunked":
            # The credential split over two chunks, so a per-chunk check would miss it.
            middle = echo.index(authorization.encode()) + len(authorization) // 2
            chunks = [echo[:middle], echo[middle:]]
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if chunks is None:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class EchoServer(ThreadingHTTPServer):
    """The echoing origin; `seen` lists the Authorization of every request it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.seen: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


ECHO_MODES = ("headers", "www-authenticate", "gzip", "markers", "chunked")


@contextmanager
def echo_origin() -> Iterator[EchoServer]:
    """An origin that answers every request with its credentials echoed back: in a header
    (`X-Echo-Authorization`), in the body (all request headers as JSON) and, by the query
    `echo=MODE`: `www-authenticate` (a 401 naming the key), `gzip` (the body compressed),
    `markers` (headers imitating the proxy's own), `chunked` (the key split over chunks)."""
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def recording_listener() -> Iterator[RecordingListener]:
    """A RecordingListener, closed afterwards."""
    listener = RecordingListener()
    try:
        yield listener
    finally:
        listener.close()


_HOP_BY_HOP = ("proxy-authorization", "proxy-connection", "connection")


class ForwardingProxy:
    """An HTTP proxy an operator would name: absolute-form requests are forwarded to their
    origin, CONNECT opens a tunnel. It records each request line, the Proxy-Authorization
    it got, and every byte that passed through it in either direction."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (request line, Proxy-Authorization)
        self._passed: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def passed(self) -> bytes:
        """Every byte relayed so far, both ways."""
        with self._lock:
            return b"".join(self._passed)

    def close(self) -> None:
        """Stop accepting."""
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            headers = [field.split(":", 1) for field in fields]
            authorization = next(
                (v.strip() for k, v in headers if k.strip().lower() == "proxy-authorization"), ""
            )
            with self._lock:
                self.requests.append((line, authorization))
            method, target, _version = line.split(" ")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                self._tunnel(client, upstream)
                return
            parts = urlsplit(target)
            kept = [
                f"{k}:{v}"
                for k, v in headers
                if k.strip().lower()
                not in ("proxy-authorization", "proxy-connection", "connection")
            ]
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            forwarded = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
            upstream = socket.create_connection((parts.hostname or "", parts.port or 80))
            upstream.sendall(forwarded.encode("latin-1") + b"\r\n\r\n" + rest)
            # One request per connection: what remains of it, and the answer, pass through.
            self._tunnel(client, upstream)

    def _tunnel(self, client: socket.socket, upstream: socket.socket) -> None:
        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while chunk := source.recv(65536):
                    with self._lock:
                        self._passed.append(chunk)
                    sink.sendall(chunk)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    with suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

        with upstream:
            up = threading.Thread(target=pump, args=(client, upstream), daemon=True)
            up.start()
            pump(upstream, client)
            up.join(5)


@contextmanager
def forwarding_proxy() -> Iterator[ForwardingProxy]:
    """A ForwardingProxy, closed afterwards."""
    proxy = ForwardingProxy()
    try:
        yield proxy
    finally:
        proxy.close()

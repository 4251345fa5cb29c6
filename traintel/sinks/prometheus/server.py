"""The exporter's HTTP(S) server: one thread, non-blocking sockets, bounded in every resource.

Why not prometheus_client's server: it gives every connection a thread and a descriptor with
no limit and no timeout, and runs the TLS handshake in its accept loop, so idle clients exhaust
the process and one silent TLS client blocks every later scrape and the shutdown. Here:

- one selector thread serves every connection; each has ``timeout`` seconds from its arrival
  to finish the TLS handshake, send its request and take its response, then it is closed;
- at most ``max_connections`` are open at once: a connection beyond that closes the one that
  has waited longest without sending a request (or, when every open one is being answered,
  itself), so idle clients can hold slots but never keep a scraper out;
- the exposition is rendered at most once per change of the records (``changed()``) and once
  per ``max_age`` seconds otherwise (the process metrics), per format, and served as cached
  bytes (gzipped once when asked for);
- the thread sleeps after every piece of work long enough to keep its CPU time under
  ``cpu_share`` of the wall clock, so scrapers, however many and however fast, take at most
  that from training (``_pause``). A scrape waits in the kernel meanwhile; it is not refused.

Every connection closed early is counted by reason; ``collect()`` exports the counts.

Why not ``asyncio.start_server`` (with ``ssl_handshake_timeout``): it would take over the TLS
handshake's states (a dozen lines of ``_advance``), but the rest stays: evicting the longest idle
connection means tracking and cancelling each connection's task, the deadline covers the request
and the answer too (a timeout per connection, not per handshake), and the CPU share needs a pause
shared by every connection's coroutine. It would add an event loop on its own thread, and its
teardown, to a sink that must close within the run's shutdown. The selector loop stays.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from traintel import threads

CLOSE_REASONS = ("limit", "timeout", "bad_request", "tls")
"""Why a connection was closed before it was answered: too many open, too slow, not HTTP, TLS failed."""

_MAX_REQUEST = 16 * 1024  # request line and headers; a scrape sends a few hundred bytes
_ACCEPTS_PER_WAKE = 64
_LONGEST_PAUSE = 0.25
_SHORTEST_PAUSE = 0.01  # scrapes arriving together are served in one wake-up of the thread


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    handshaking: bool
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None


@dataclass(eq=False)
class _Rendered:
    version: int
    rendered: float
    body: bytes
    zipped: bytes | None = None


def server_context(certfile: str, keyfile: str | None, client_cafile: str | None) -> ssl.SSLContext:
    """A TLS server context; with ``client_cafile``, clients must present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    if client_cafile is not None:
        context.load_verify_locations(cafile=client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class MetricsServer:
    """Serve ``registry``'s exposition on ``host:port`` (``port`` 0: any free one) at ``/metrics``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 32,
        timeout: float = 5.0,
        cpu_share: float = 0.05,
        max_age: float = 1.0,
    ) -> None:
        self.registry = registry
        self.tls = tls
        self.max_connections = max_connections
        self.timeout = timeout
        self.cpu_share = cpu_share
        self.max_age = max_age
        self.closed_early: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        """Connections closed before being answered, by reason (``CLOSE_REASONS``)."""
        self.renders = 0
        """Expositions rendered so far (one per change of the records and format, at most)."""
        self._version = 0
        self._cache: dict[str, _Rendered] = {}
        self._conns: dict[socket.socket, _Conn] = {}
        self._stopping = False
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._listener = socket.socket(family[0], socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(family[4])
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="traintel-metrics", daemon=True)
        threads.start(self._thread)

    def changed(self) -> None:
        """New records arrived: the next scrape renders the exposition anew (called per delivery)."""
        self._version += 1

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def collect(self) -> Iterator[Metric]:
        """The server's own health: connections closed early by reason, and those open now."""
        closed = CounterMetricFamily(
            "traintel_exporter_connections_closed",
            "Connections to the exporter closed before being answered, by reason.",
            labels=["reason"],
        )
        for reason, count in self.closed_early.items():
            closed.add_metric([reason], float(count))
        yield closed
        yield GaugeMetricFamily(
            "traintel_exporter_open_connections", "Connections open to the exporter.", value=len(self._conns)
        )

    def stop(self) -> None:
        """Stop serving at once: close the listener and every connection."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            for conn in list(self._conns.values()):
                self._close(conn)
            self._selector.close()
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the serving thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            wait = min((c.deadline for c in self._conns.values()), default=now + 1.0) - now
            events = self._selector.select(max(0.0, wait))
            if self._stopping:
                return
            cpu = time.thread_time()
            for key, _mask in events:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    self._advance(key.data)
            self._expire(time.monotonic())
            self._pause(time.thread_time() - cpu)

    def _pause(self, spent: float) -> None:
        """Keep this thread's CPU time under ``cpu_share`` of the wall clock: after ``spent`` seconds
        of work, sleep ``spent * (1/share - 1)`` (at least a few milliseconds, so scrapes arriving
        together are served in one wake-up, and at most a quarter second)."""
        if spent > 0:
            time.sleep(min(_LONGEST_PAUSE, max(_SHORTEST_PAUSE, spent * (1 / self.cpu_share - 1))))

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: free the longest-waiting slot, try later
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._make_room(None)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections and not self._make_room(sock):
                continue
            handshaking = self.tls is not None
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError):
                    self.closed_early["tls"] += 1
                    sock.close()
                    continue
            conn = _Conn(sock, time.monotonic() + self.timeout, handshaking)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._advance(conn)  # a scraper's request is usually there already: one wake-up, not two

    def _make_room(self, newcomer: socket.socket | None) -> bool:
        """Close the connection that has waited longest without a whole request; when every open
        one is being answered, close ``newcomer`` instead. True when there is room now."""
        waiting = [c for c in self._conns.values() if c.outbox is None]
        self.closed_early["limit"] += 1
        if waiting:
            self._close(min(waiting, key=lambda c: c.deadline))
            return True
        if newcomer is not None:
            newcomer.close()
        return False

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.closed_early["timeout"] += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _want(self, conn: _Conn, events: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(conn.sock, events, conn)

    def _advance(self, conn: _Conn) -> None:
        """Take ``conn`` as far as its socket allows: handshake, read the request, send the answer."""
        try:
            if conn.handshaking:
                assert isinstance(conn.sock, ssl.SSLSocket)
                conn.sock.do_handshake()
                conn.handshaking = False
            if conn.outbox is None and not self._read(conn):
                return
            self._send(conn)
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
        except (BlockingIOError, InterruptedError):
            pass
        except (ssl.SSLError, ssl.CertificateError) as exc:
            if conn.handshaking or not isinstance(exc, ssl.SSLZeroReturnError):
                self.closed_early["tls"] += 1
            self._close(conn)
        except OSError:  # the client went away
            self._close(conn)

    def _read(self, conn: _Conn) -> bool:
        """Read what has arrived; True once a whole request is read and its answer is in ``outbox``."""
        while True:
            data = conn.sock.recv(4096)
            if not data:  # closed before sending a whole request
                self._close(conn)
                return False
            conn.inbox += data
            end = conn.inbox.find(b"\r\n\r\n")
            if end >= 0:
                conn.outbox = memoryview(self._answer(bytes(conn.inbox[:end])))
                self._want(conn, selectors.EVENT_WRITE)
                return True
            if len(conn.inbox) > _MAX_REQUEST:
                self.closed_early["bad_request"] += 1
                conn.outbox = memoryview(
                    _response("431 Request Header Fields Too Large", b"request too large\n")
                )
                self._want(conn, selectors.EVENT_WRITE)
                return True

    def _send(self, conn: _Conn) -> None:
        assert conn.outbox is not None
        while conn.outbox:
            sent = conn.sock.send(conn.outbox)
            conn.outbox = conn.outbox[sent:]
        self._close(conn)

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.closed_early["bad_request"] += 1
            return _response("400 Bad Request", b"not an HTTP request\n")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"use GET\n", [("Allow", "GET, HEAD")])
        if urlsplit(target).path not in ("/metrics", "/"):
            return _response("404 Not Found", b"metrics are served at /metrics\n")
        zipped = gzip_accepted(headers.get("accept-encoding", ""))
        content_type, body = self._exposition(headers.get("accept", ""), zipped)
        extra = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
        if zipped:
            extra.append(("Content-Encoding", "gzip"))
        return _response("200 OK", body, extra, head_only=method == "HEAD")

    def _exposition(self, accept: str, zipped: bool) -> tuple[str, bytes]:
        """The exposition in the format ``accept`` asks for, gzipped when ``zipped``: cached per
        format, rendered again only after ``changed()`` or when older than ``max_age``."""
        encoder, content_type = choose_encoder(accept)
        now = time.monotonic()
        cached = self._cache.get(content_type)
        if cached is None or cached.version != self._version or now - cached.rendered >= self.max_age:
            version = self._version  # read first: a change while rendering renders again next time
            cached = self._cache[content_type] = _Rendered(version, now, encoder(self.registry))
            self.renders += 1
        if not zipped:
            return content_type, cached.body
        if cached.zipped is None:
            cached.zipped = gzip.compress(cached.body, compresslevel=6)
        return content_type, cached.zipped


def _response(
    status: str,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    fields = list(headers or [])
    if not any(name == "Content-Type" for name, _ in fields):
        fields.insert(0, ("Content-Type", "text/plain; charset=utf-8"))
    fields += [("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)

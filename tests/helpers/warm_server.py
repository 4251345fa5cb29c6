"""The warm interpreter that ``tests.helpers.warm`` forks children from.

Started as ``python -m tests.helpers.warm_server SOCKET``: it imports what every child would
(torch, torchrun's launcher, Ignite, pydantic, traintel's command line and run) once, prints ``ready``, and
then serves requests on the Unix socket ``SOCKET`` (SOCK_SEQPACKET, one message a request). A
request is a JSON object (``argv`` after the interpreter, ``cwd``, ``env``, ``unbuffered``) with the
child's stdin, stdout and stderr as passed file descriptors. The server forks; the child becomes
what ``python [-u] -m MODULE ARGS`` or ``python [-u] -c CODE ARGS`` would be in ``cwd`` with
``env``, and runs it from this module's top level, so that it ends the way any interpreter ends
(non-daemon threads joined, atexit handlers run, streams flushed, an uncaught exception printed
and exit status 1). The server answers with the child's pid and a pidfd for it, and, when the
child has ended, with its wait status. It exits when its stdin closes (the test worker is gone).

Importing them starts no thread and reads no environment variable, so a fork is safe and a child
is what it would have been had it imported them itself.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import sys
from typing import Any

PRELOAD = (
    "torch",
    "torch.distributed.run",
    "ignite.engine",
    "traintel.cli.main",
    "traintel.run.api",
    "traintel.tasks.forecast",
)
"""Imported once here instead of in every child: about 3 s of CPU each time."""

MAX_REQUEST = 1 << 20


def _stream(fd: int, like: Any, *, unbuffered: bool) -> io.TextIOWrapper:
    """A text stream on ``fd`` as the interpreter makes one at start-up: ``-u`` leaves out the
    buffer; stderr, or a terminal, is line-buffered."""
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    layer: Any = raw
    if fd == 0:
        layer = io.BufferedReader(raw)
    elif not unbuffered:
        layer = io.BufferedWriter(raw)
    return io.TextIOWrapper(
        layer,
        encoding=like.encoding,
        errors=like.errors,
        line_buffering=fd > 0 and not unbuffered and (fd == 2 or raw.isatty()),
        write_through=fd > 0 and unbuffered,
    )


def _become(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """In the forked child: take the request's streams, directory, environment and path."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    unbuffered = bool(request["unbuffered"])
    sys.stdin = sys.__stdin__ = _stream(0, sys.__stdin__, unbuffered=unbuffered)
    sys.stdout = sys.__stdout__ = _stream(1, sys.__stdout__, unbuffered=unbuffered)
    sys.stderr = sys.__stderr__ = _stream(2, sys.__stderr__, unbuffered=unbuffered)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # sys.path as a fresh interpreter would have it: the script's place, then PYTHONPATH, then the
    # standard library and site-packages this interpreter found at start-up
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [os.getcwd() if request["argv"][0] == "-m" else "", *extra]
    importlib.invalidate_caches()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return request


class _Server:
    """The request loop: one selector over the listening socket, stdin and the children's pidfds."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
        self.children: dict[int, tuple[int, socket.socket]] = {}
        """pidfd -> (pid, the connection its status goes to)"""

    def serve(self) -> dict[str, Any]:
        """Serve until stdin closes; returns only in a forked child, with its request."""
        while True:
            for key, _ in self.selector.select():
                if key.data == "stdin" and not os.read(key.fd, 4096):
                    sys.exit(0)
                if key.data == "accept":
                    job = self._fork()
                    if job is not None:
                        return job
                elif key.data == "child":
                    self._ended(key.fd)

    def _fork(self) -> dict[str, Any] | None:
        conn, _ = self.listener.accept()
        message, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
        pid = os.fork()
        if pid == 0:
            self.selector.close()
            self.listener.close()
            for pidfd, (_, other) in self.children.items():
                os.close(pidfd)
                other.close()
            conn.close()
            return _become(json.loads(message), fds)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(conn, [json.dumps({"pid": pid}).encode()], [pidfd])
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, "child")
        return None

    def _ended(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):  # the test no longer listens
            conn.send(json.dumps({"status": status}).encode())
        conn.close()


def serve(path: str) -> dict[str, Any]:
    """Preload, say ``ready``, and serve on ``path``; returns only in a forked child, with its request."""
    for name in PRELOAD:
        importlib.import_module(name)
    # what is loaded now stays for every child: no collection of a child walks it (at exit that
    # saved about 0.45 s a child), and no page of it is copied for a collection's bookkeeping
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = _Server(path)
    print("ready", flush=True)
    return server.serve()


if __name__ == "__main__":
    job = serve(sys.argv[1])
    if job["argv"][0] == "-m":
        sys.argv = [job["argv"][1], *job["argv"][2:]]
        runpy.run_module(job["argv"][1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *job["argv"][2:]]
        exec(
            compile(job["argv"][1], "<string>", "exec"),
            {"__name__": "__main__", "__builtins__": __builtins__},
        )

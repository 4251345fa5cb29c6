"""Child interpreters forked from a warm one: real processes, without paying for torch's import.

A test that starts ``python -m traintel ...`` spends about 3 s of CPU importing torch, Ignite, pydantic
and traintel before training, and the suite starts a few hundred of them. ``start`` asks a
server (``tests.helpers.warm_server``, one per test worker, started on first use) that has imported
those modules once to fork the child instead. The child is still its own process with its own pid,
file descriptors, signal handlers, environment and directory, and it ends the way an interpreter
ends, so signals, kill -9, pipes and exit statuses are as real as with ``subprocess.Popen``.

What a forked child cannot show is the interpreter's own start-up: a test about the first seconds
of a process (a signal during imports, whether torch is imported at all) passes ``fresh=True``.
``TRAINTEL_TEST_FRESH=1`` in the environment makes every child a fresh interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import locale
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.helpers.paths import ROOT

FRESH = os.environ.get("TRAINTEL_TEST_FRESH") == "1"
"""Every child a fresh interpreter: the check that forking hides nothing."""

Stream = int | IO[Any] | None


class WarmPopen:
    """The part of ``subprocess.Popen`` the tests use, for a child forked by the warm server."""

    def __init__(
        self,
        conn: socket.socket,
        *,
        args: list[str],
        stdout: IO[Any] | None,
        stderr: IO[Any] | None,
        stdin: IO[Any] | None,
        text: bool,
    ) -> None:
        message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise RuntimeError("the warm server forked no child")
        self.args = args
        self.pid: int = json.loads(message)["pid"]
        self.returncode: int | None = None
        self.stdout, self.stderr, self.stdin = stdout, stderr, stdin
        self._conn, self._pidfd, self._text = conn, fds[0], text

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                self._ended(self._conn.recv(4096))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._ended(self._conn.recv(4096))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def _ended(self, message: bytes) -> None:
        self.returncode = os.waitstatus_to_exitcode(json.loads(message)["status"])
        self._conn.close()
        os.close(self._pidfd)

    def send_signal(self, sig: int) -> None:
        """Signal the child through its pidfd: never another process that took its pid."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: str | bytes | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Read stdout and stderr to their ends (``input`` is not supported), then wait."""
        assert input is None, "the warm children take no input"
        deadline = None if timeout is None else time.monotonic() + timeout
        open_ = [s for s in (self.stdout, self.stderr) if s is not None and not s.closed]
        chunks: dict[int, list[bytes]] = {s.fileno(): [] for s in open_}
        with selectors.DefaultSelector() as selector:
            for fd in chunks:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        out: list[Any] = []
        for stream in (self.stdout, self.stderr):
            if stream is None or stream not in open_:
                out.append(None)
                continue
            data = b"".join(chunks[stream.fileno()])
            stream.close()
            out.append(_decode(data) if self._text else data)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out[0], out[1]

    def __enter__(self) -> WarmPopen:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None:
                stream.close()
        self.wait()


def _decode(data: bytes) -> str:
    """Bytes as ``subprocess`` decodes a text-mode child's output: locale encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


class _Server:
    """The warm server of this test worker."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="traintel-warm-")
        self.path = os.path.join(self._dir, "socket")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__") and k != "PYTHONPATH"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.warm_server", self.path],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"the warm server did not start: {line!r}, exit {self.proc.wait()}")
        atexit.register(self.close)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server exits when its stdin closes
        self.proc.wait(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.rmdir(self._dir)


@functools.cache
def _server() -> _Server:
    """This worker's server, started on first use."""
    return _Server()


def _pipe_or(spec: Stream, fd: int, *, null: int) -> tuple[int, int | None]:
    """The fd the child gets for ``spec`` and, for PIPE, the read or write end the test keeps."""
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (r, w) if fd == 0 else (w, r)
    if spec == subprocess.DEVNULL or spec is None:
        return null, None
    if isinstance(spec, int):
        return spec, None
    return spec.fileno(), None


def start(
    argv: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str],
    *,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    text: bool = False,
    fresh: bool = False,
) -> subprocess.Popen[Any] | WarmPopen:
    """``python ARGV`` in ``cwd`` with exactly ``env``, forked from the warm server unless ``fresh``.

    ``argv`` is what follows the interpreter: ``[-u] -m MODULE ARGS`` or ``[-u] -c CODE ARGS``. The
    streams take what ``subprocess.Popen`` takes (``None`` is /dev/null for a warm child, whose parent's
    streams are the server's); ``stderr=STDOUT`` is not supported."""
    if fresh or FRESH:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
        )
    assert stderr != subprocess.STDOUT, "stderr=STDOUT: pass one pipe as both"
    args = list(argv)
    unbuffered = args[0] == "-u"
    if unbuffered:
        args = args[1:]
    assert args[0] in ("-m", "-c"), args
    null = os.open(os.devnull, os.O_RDWR)
    kept: list[int | None] = []
    given: list[int] = []
    try:
        for fd, spec in enumerate((stdin, stdout, stderr)):
            child_fd, ours = _pipe_or(spec, fd, null=null)
            given.append(child_fd)
            kept.append(ours)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(_server().path)
        request = {"argv": args, "cwd": str(cwd), "env": dict(env), "unbuffered": unbuffered}
        socket.send_fds(conn, [json.dumps(request).encode()], given)
    finally:
        for fd, spec in zip(given, (stdin, stdout, stderr), strict=False):
            if spec == subprocess.PIPE:
                os.close(fd)
        os.close(null)
    files: list[IO[Any] | None] = []
    for fd, ours in enumerate(kept):
        if ours is None:
            files.append(None)
        elif text:
            files.append(open(ours, "w" if fd == 0 else "r", encoding=locale.getpreferredencoding(False)))  # noqa: SIM115
        else:
            files.append(open(ours, "wb" if fd == 0 else "rb"))  # noqa: SIM115
    return WarmPopen(
        conn, args=[sys.executable, *argv], stdout=files[1], stderr=files[2], stdin=files[0], text=text
    )


def run(
    argv: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str],
    *,
    timeout: float,
    text: bool = True,
    fresh: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """``python ARGV`` to its end, its output captured (``subprocess.run`` for ``start``)."""
    proc = start(argv, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text, fresh=fresh)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess([sys.executable, *argv], proc.returncode, out, err)

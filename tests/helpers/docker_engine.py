"""A private Docker engine for the image tests, and the stand-ins for what it cannot pull here.

- ``Engine``: ``dockerd`` on a private socket with ``--bridge=none --iptables=false`` (no network
  of its own: builds and containers use the host's, and nothing leaves loopback but what the
  build itself fetches from the package registries), its data under the cache directory, so
  images and build layers survive between runs; stopped again when the tests end.
- ``standin_base``: a Debian bookworm root file system made by ``debootstrap`` from the apt
  mirror this machine is configured with, with python3, venv, pip (``python`` too) and this
  machine's CA bundle, imported as an image. It stands in for ``python:3.11-slim-bookworm``
  through the Dockerfile's ``PYTHON_IMAGE`` argument; the Dockerfile knows nothing of it.
- ``torch_index``: a PEP 503 index of torch and its dependencies (``pip download``), served on
  127.0.0.1, standing in for ``TORCH_INDEX_URL``.

The cache directory is ``$TRAINTEL_TEST_CACHE`` or ``~/.cache/traintel-tests``.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("TRAINTEL_TEST_CACHE") or Path.home() / ".cache" / "traintel-tests")
STANDIN = "traintel-test/python-standin:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"


class Unavailable(Exception):
    """No Docker engine can be started here (the tests skip, saying why)."""


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 ``.sources`` or ``sources.list``)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", block, flags=re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and "main" in fields.get("Components", ""):
                return fields["URIs"].split()[0]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    msg = "no bookworm apt mirror is configured in /etc/apt"
    raise Unavailable(msg)


class Engine:
    """A dockerd of our own; ``docker(...)`` runs the client against it."""

    def __init__(self, work: Path) -> None:
        if os.geteuid() != 0:
            msg = "dockerd needs root"
            raise Unavailable(msg)
        dockerd = shutil.which("dockerd")
        if dockerd is None or shutil.which("docker") is None:
            msg = "no dockerd/docker here (apt-get install docker.io)"
            raise Unavailable(msg)
        self.socket = work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}
        self.log = work / "dockerd.log"
        data = CACHE / "docker"
        data.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false",
                 "--host", f"unix://{self.socket}", "--data-root", str(data),
                 "--exec-root", str(work / "exec"), "--pidfile", str(work / "dockerd.pid")],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.docker("info", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                msg = f"dockerd did not start: {tail[0][:200]}"
                raise Unavailable(msg)
            time.sleep(0.5)

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            msg = f"docker {' '.join(args[:3])} ... exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            raise AssertionError(msg)
        return done

    def stop(self) -> None:
        """Stop dockerd, and undo the network-namespace mount it leaves in its exec root."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mounted in (self.socket.parent / "exec" / "netns").glob("*"):
            subprocess.run(["umount", str(mounted)], capture_output=True, check=False)


def standin_base(engine: Engine) -> str:
    """The stand-in base image's tag, imported from the cached root file system (made once)."""
    if engine.docker("image", "inspect", STANDIN, check=False).returncode == 0:
        return STANDIN
    tarball = CACHE / "python-standin-bookworm.tar"
    if not tarball.exists():
        _debootstrap(tarball)
    engine.docker(
        "import",
        "--change",
        f"ENV PIP_CERT={CA_BUNDLE}",
        "--change",
        'CMD ["python3"]',
        str(tarball),
        STANDIN,
    )
    return STANDIN


def _debootstrap(tarball: Path) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        msg = "no debootstrap here (apt-get install debootstrap)"
        raise Unavailable(msg)
    work = CACHE / "rootfs.partial"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(
        [debootstrap, "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(work), apt_mirror()],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    shutil.copyfile(CA_BUNDLE, work / "etc" / "ssl" / "certs" / "ca-certificates.crt")  # this machine's CAs
    for package in (work / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        package.unlink()
    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        tar.add(work, arcname=".")
    partial.replace(tarball)
    shutil.rmtree(work, ignore_errors=True)


def torch_index(constraints: Path) -> Path:
    """``<cache>/torch-index/simple``: torch (the version ``constraints.txt`` pins) and its
    dependencies, as ``pip download`` gets them, under a PEP 503 layout (made once)."""
    root = CACHE / "torch-index"
    simple = root / "simple"
    if (simple / "torch" / "index.html").exists():
        return simple
    files = root / "files"
    version = re.search(r"^torch==(\S+)", constraints.read_text(), flags=re.MULTILINE)
    assert version is not None, "constraints.txt pins no torch version"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(files), f"torch=={version[1]}"],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    by_project: dict[str, list[str]] = {}
    for wheel in sorted(files.iterdir()):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        by_project.setdefault(name, []).append(wheel.name)
    for project, names in by_project.items():
        page = simple / project
        page.mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="../../files/{html.escape(n)}">{html.escape(n)}</a>\n' for n in names)
        (page / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    return simple


INDEX_PORT = 38_503
"""The port ``served`` tries first. The index's URL is a build argument of the torch layer, so it is
part of that layer's cache key: the same URL on every build keeps torch (and what follows it up to
traintel's own code) cached, and a rebuild after a change to traintel takes seconds, not minutes."""


@contextlib.contextmanager
def served(directory: Path) -> Iterator[str]:
    """Serve ``directory``'s parent on 127.0.0.1 (``INDEX_PORT``, or a free port when something else
    holds it); yields the URL of ``directory``."""
    handler = functools.partial(_QuietHandler, directory=str(directory.parent))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{directory.name}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

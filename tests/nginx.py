"""The shipped ``deploy/nginx/nginx.conf``, run for real on loopback in front of test nodes:
only its listen address, access log and upstream list are rewritten. Every nginx started here
is stopped here, by its PID."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, http


class Nginx:
    """Starts nginx processes in ``directory``; ``stop_all`` stops them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, upstream_ports: int | Sequence[int], log_format: str | None = None,
              port: int | None = None) -> int:
        """nginx with the shipped config, balancing over ``upstream_ports`` (``log_format``:
        another ``sync`` format; ``port``: where it listens, a free port by default)."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            pytest.skip("nginx is not installed (scripts/test.sh installs it)")
        upstreams = [upstream_ports] if isinstance(upstream_ports, int) else list(upstream_ports)
        port = port or free_port()
        conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("access_log /dev/stdout sync;", f"access_log {self.directory}/access.log sync;")
        if log_format is not None:
            conf, found = re.subn(r"log_format sync [^;]*;", lambda _: f"log_format sync '{log_format}';", conf)
            assert found == 1
        (self.directory / "nginx.conf").write_text(conf)
        # As the shipped upstream.conf: a node that refuses connections is skipped for a while.
        servers = "".join(f"server 127.0.0.1:{upstream} max_fails=2 fail_timeout=5s; "
                          for upstream in upstreams)
        (self.directory / "upstream.conf").write_text(
            f"upstream sync_gateway {{ least_conn; {servers}keepalive 8; }}\n")
        process = subprocess.Popen(
            [binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
             "-g", f"daemon off; pid {self.directory}/nginx.pid; error_log {self.directory}/error.log;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.started.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                http("GET", f"http://127.0.0.1:{port}/healthz")  # any answer: nginx is up
                return port
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"nginx did not start: {(self.directory / 'error.log').read_text()}")

    def stop_all(self) -> None:
        for process in self.started:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()


@contextmanager
def nginx_in(directory: Path) -> Iterator[Nginx]:
    servers = Nginx(directory)
    try:
        yield servers
    finally:
        servers.stop_all()

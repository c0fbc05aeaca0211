"""Run an ASGI app on uvicorn: a socket bound first (so ``--port 0`` works and the address is printed
before the first request), access logs, and uvicorn's graceful shutdown on SIGINT / SIGTERM: the
listening socket closes, requests in flight are answered, then the app's lifespan ends."""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from esn.errors import EsnError


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> None:
    """EsnError unless ``port`` is a TCP port number (0 asks the system for a free one)."""
    if not 0 <= port <= 65535:
        raise EsnError(f"--port {port} is not a TCP port (0..65535; 0 picks a free one)")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); EsnError if the address is taken or bad."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise EsnError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, host: str, port: int, *, name: str, graceful_s: float | None = None, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT / SIGTERM; prints ``<name>: listening on http://host:port`` on stderr."""
    import uvicorn

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"{name}: listening on http://{shown}:{bound} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    from esn.serve.guard import MAX_BUFFERED_HEADER_BYTES, json_h11_protocol

    # h11 with a JSON 400 for what it cannot parse, and a bound on headers while they arrive.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_s, lifespan="on",
                            http=json_h11_protocol(), h11_max_incomplete_event_size=MAX_BUFFERED_HEADER_BYTES)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise EsnError(f"{name} did not start (see the log above)")


class Launched:
    """An ``esn serve`` / ``esn human serve`` child process and its base URL; stderr is collected in ``log``.

    A context manager: on exit it stops the process with SIGTERM (a graceful shutdown) and waits.
    """

    def __init__(self, process: subprocess.Popen, url: str, log: list[str]):
        self.process, self.url, self.log = process, url, log

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Send ``sig`` and wait; returns the exit status (kills after ``timeout`` seconds)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(args: list[str], *, ready_path: str = "/healthz", timeout: float = 300,
           env: dict[str, str] | None = None) -> Launched:
    """Run ``python -m esn *args`` (a serve command; give ``--port 0``), wait until ``ready_path`` answers.

    For tests, benchmarks and notebooks. Raises ``EsnError`` with the end of its log if it exits or does
    not answer within ``timeout`` seconds.
    """
    process = subprocess.Popen([sys.executable, "-m", "esn", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout

    def fail(why: str) -> EsnError:
        process.kill()
        process.wait()
        return EsnError(f"esn {' '.join(args[:1])} {why}: {''.join(log)[-3000:]}")

    url = None
    while url is None:
        found = [m.group(1) for line in list(log) if (m := re.search(r"listening on (http://\S+)", line))]
        url = found[0] if found else None
        if process.poll() is not None:
            raise fail(f"exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise fail("did not start in time")
        time.sleep(0.05)
    while True:
        try:
            with urllib.request.urlopen(url + ready_path, timeout=5):
                return Launched(process, url, log)
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None:
            raise fail(f"exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise fail(f"did not answer {ready_path} in time")
        time.sleep(0.1)

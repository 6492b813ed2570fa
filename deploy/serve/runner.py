"""Run the app under uvicorn: in the foreground (`tokenskip serve`) or on a background thread
(tests and `bench-serve --in-process`), bound to a socket we open ourselves so port 0 works and
the real port is known before the first request."""

from __future__ import annotations

import socket
import threading
import time


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, log_level: str = "warning"):
    import uvicorn

    # h11: pure Python, the same everywhere; timeout_graceful_shutdown bounds a stop with open streams
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=3)


DRAIN_TIMEOUT_S = 600.0  # a SIGTERM waits this long at most for the requests in flight (--request-timeout: that)


def draining_server(config, engine, drain_timeout: float = DRAIN_TIMEOUT_S):
    """A uvicorn.Server that drains on SIGTERM/SIGINT: the engine takes no new work (new requests
    get 503, /health 503 "draining"), the requests in flight and in the queue run to their end,
    then uvicorn shuts down and the process exits 0. A second signal exits at once (uvicorn's
    own handling). uvicorn alone would close the open streams after timeout_graceful_shutdown
    and re-raise the signal (exit status 143)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining or self.should_exit:
                return super().handle_exit(sig, frame)
            self.draining = True
            engine.drain()
            threading.Thread(target=self._exit_when_idle, name="tokenskip-drain", daemon=True).start()

        def _exit_when_idle(self) -> None:
            engine.wait_idle(drain_timeout)
            self.should_exit = True

    return DrainingServer(config)


class ServerThread:
    """uvicorn on a daemon thread; `stop()` (or leaving the `with`) shuts it down within seconds."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="tokenskip-uvicorn")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (even by SIGKILL), so
    a killed benchmark or test never leaves servers behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`tokenskip serve ARGS --port 0` in a subprocess; the URL is read from its start-up line.
    `stop()` terminates it (SIGTERM: the server drains, then SIGKILL after a grace period)."""

    def __init__(self, args: list[str], timeout: float = 600.0, env: dict | None = None, prelude: str = "") -> None:
        """prelude: Python run before the CLI (tests register a backend of their own there)."""
        import re
        import subprocess
        import sys

        cmd = [sys.executable, "-c", f"{prelude}\nfrom tokenskip.cli import main; main()", "serve", *args,
               "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.lines: list[str] = []
        found = threading.Event()
        pattern = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")
        self.url = ""

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                match = pattern.search(line)
                if match and not self.url:
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("`tokenskip serve` did not start:\n" + "".join(self.lines[-20:]))
        self._wait_healthy(deadline)

    def _wait_healthy(self, deadline: float) -> None:
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("`tokenskip serve` never became healthy:\n" + "".join(self.lines[-20:]))
            time.sleep(0.1)

    def stop(self, grace: float = 20.0) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

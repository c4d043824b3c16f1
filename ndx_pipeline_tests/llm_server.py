"""Test helpers: a real llama-cpp-python OpenAI-compatible server on 127.0.0.1 serving the bundled SmolLM2 GGUF,
and a small fault-injecting HTTP proxy to put in front of it.

Import the fixtures into a test module (`from ndx_pipeline_tests.llm_server import llama_server, fault_proxy`).
The server is the real thing; the proxy is the only fake, and it only injects faults (429 with Retry-After, 5xx,
stalls, truncated or cut bodies, rewritten answers) and counts requests.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ndx_pipeline.core.models import bundled_gguf

HOST = "127.0.0.1"
TEST_API_KEY = "sk-test-SECRET123"
MODEL_ALIAS = "smollm2-135m-instruct-q4_1"
# uvicorn's access line, which llama_cpp.server writes for every request it answers (also with --verbose false):
# INFO:     127.0.0.1:52618 - "POST /v1/completions HTTP/1.1" 200 OK
ACCESS_LINE = re.compile(r'^INFO:\s+\S+ - "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})', re.M)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_available() -> str | None:
    """None when llama-cpp-python's server can run here, else why not."""
    for mod in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            return f"llama-cpp-python[server] is not installed (no module {mod!r})"
    return None


@dataclass
class LlamaServer:
    base_url: str  # ends in /v1
    port: int
    api_key: str
    model: str
    process: subprocess.Popen
    log_path: Path

    def assert_alive(self) -> None:
        """Fail with the server's log when the server process has died (a crash inside llama.cpp aborts it)."""
        if self.process.poll() is not None:
            raise AssertionError(f"llama_cpp.server exited with {self.process.returncode}; its log ends:\n"
                                 f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def logged_requests(self) -> collections.Counter[str]:
        """Every request the server itself logged so far (uvicorn's access lines), counted by "METHOD path status",
        e.g. "POST /v1/completions 200"."""
        found = collections.Counter()
        for m in ACCESS_LINE.finditer(self.log_path.read_text(errors="replace")):
            found[f"{m['method']} {m['path'].split('?', 1)[0]} {m['status']}"] += 1
        return found

    def completions_logged(self) -> int:
        """The `/v1/completions` requests the server answered with 200, from its own log."""
        return self.logged_requests()["POST /v1/completions 200"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _wait_ready(port: int, api_key: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {api_key}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def run_llama_server(log_dir: Path, model_path: str | None = None, api_key: str = TEST_API_KEY,
                     threads: int | None = None, startup_timeout: float = 120.0, n_ctx: int = 2048):
    """Start `python -m llama_cpp.server` on 127.0.0.1 with a free port; stop it on exit.

    logits_all is on so /v1/completions can echo prompt logprobs; the server requires `api_key`. n_ctx: its
    context window (2048: the small context of issue 16 item 9, where the default explainer prompt did not fit).
    """
    if model_path is None:
        model_path = str(bundled_gguf())
    if threads is None:  # leave a core to the test process (and to whatever else runs on a small machine)
        threads = int(os.environ.get("NDX_TEST_LLAMA_THREADS") or max(1, (os.cpu_count() or 2) // 2))
    log_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a free port can be taken between the check and the bind; try again then
        port = free_port()
        log_path = log_dir / f"llama_server_{port}.log"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", MODEL_ALIAS,
               "--host", HOST, "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(n_ctx), "--logits_all", "true", "--verbose", "false", "--api_key", api_key]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = LlamaServer(f"http://{HOST}:{port}/v1", port, api_key, MODEL_ALIAS, process, log_path)
        try:
            _wait_ready(port, api_key, process, log_path, startup_timeout)
        except RuntimeError:
            server.stop()
            if "address already in use" in log_path.read_text().lower():
                continue
            raise
        try:
            yield server
        finally:
            server.stop()
        return
    raise RuntimeError("could not find a free port for llama_cpp.server")


def gguf_with_bos(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of a GGUF whose tokenizer adds a BOS token (metadata `tokenizer.ggml.add_bos_token` set to true):
    the same weights, as llama.cpp serves models like Llama. Used to show how the server's echo alignment
    depends on it."""
    key = b"tokenizer.ggml.add_bos_token"
    with open(src, "rb") as f:
        head = f.read(1 << 20)
    at = head.find(key)
    if at < 0 or int.from_bytes(head[at + len(key): at + len(key) + 4], "little") != 7:  # 7: GGUF bool
        raise ValueError(f"{src} has no boolean {key.decode()} in its metadata")
    import shutil

    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(at + len(key) + 4)
        f.write(b"\x01")
    return Path(dst)


# ---------------------------------------------------------------------------------------------------------------
# Fault-injecting proxy


@dataclass
class Fault:
    """What the proxy does to one request. kinds: status (answer `status` itself, with `headers`, and `payload`
    or an error body), stall (wait `seconds`, then close without answering), truncate (forward, then return the
    first half of the body with a matching Content-Length: a complete HTTP answer carrying broken JSON), cut
    (forward, announce the whole body but send half of it and close), rewrite (forward and pass the JSON answer
    through `rewrite`)."""

    kind: str
    status: int = 200
    headers: dict | None = None
    seconds: float = 0.0
    rewrite: Callable[[dict], dict] | None = None
    payload: dict | None = None

    @staticmethod
    def rate_limited(retry_after: float | str = 1) -> Fault:
        return Fault("status", 429, {"Retry-After": str(retry_after)})

    @staticmethod
    def server_error(status: int = 500) -> Fault:
        return Fault("status", status)

    @staticmethod
    def client_error(status: int = 400) -> Fault:
        return Fault("status", status)

    @staticmethod
    def stall(seconds: float) -> Fault:
        return Fault("stall", seconds=seconds)

    @staticmethod
    def truncate() -> Fault:
        return Fault("truncate")

    @staticmethod
    def cut() -> Fault:
        return Fault("cut")

    @staticmethod
    def respond(payload: dict, status: int = 200) -> Fault:
        """Answer with `payload` without asking the server (to hand the client a malformed answer cheaply)."""
        return Fault("status", status, payload=payload)

    @staticmethod
    def rewriting(fn: Callable[[dict], dict]) -> Fault:
        return Fault("rewrite", rewrite=fn)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream_port`. Each request takes the next planned fault (or
    passes through when none is left); `requests` counts every request by path, `forwarded` those that reached
    the server, `seen_auth` whether requests carried the expected bearer key; `answered` lists (path, body) of every
    request the server answered, in order (the server's request log)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._plan: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.forwarded: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.answered: list[tuple[str, bytes]] = []
        self._hold: list | None = None  # [paths, requests still let through, seconds]
        self.held = 0  # requests held so far (`hold`)
        self.in_flight = 0  # requests forwarded to the server and not yet answered
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self)

            def do_POST(self):
                proxy._handle(self)

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = self._server.server_address[1]
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def plan(self, *faults: Fault) -> None:
        with self._lock:
            self._plan.extend(faults)

    def hold(self, paths: tuple[str, ...], after: int, seconds: float) -> None:
        """Let `after` more requests to `paths` through, then hold every later one for `seconds` without forwarding
        it (its client waits), until `hold_off`; `held` counts the requests held."""
        with self._lock:
            self._hold = [tuple(paths), int(after), float(seconds)]

    def hold_off(self) -> None:
        """Let requests through again (those held stay held)."""
        with self._lock:
            self._hold = None

    def pending(self) -> int:
        with self._lock:
            return len(self._plan)

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.forwarded.clear()
            self.events.clear()
            self.answered.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, handler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(HOST, self.upstream_port, timeout=600)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() in ("authorization", "content-type", "accept")}
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() == "content-type"], data
        finally:
            conn.close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        with self._lock:
            fault = self._plan.popleft() if self._plan else None
            if self._hold is not None and path in self._hold[0]:
                if self._hold[1] > 0:
                    self._hold[1] -= 1
                else:
                    fault = Fault.stall(self._hold[2])
                    self.held += 1
            self.requests[path] += 1
            self.events.append((path, fault.kind if fault else "pass"))
            self.auth_headers.append(handler.headers.get("Authorization") or "")
        try:
            if fault is not None and fault.kind == "status":
                payload = json.dumps(fault.payload if fault.payload is not None else
                                     {"error": {"message": f"injected {fault.status}", "type": "injected"}}).encode()
                handler.send_response(fault.status)
                for k, v in (fault.headers or {}).items():
                    handler.send_header(k, v)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                handler.wfile.write(payload)
                return
            if fault is not None and fault.kind == "stall":
                time.sleep(fault.seconds)
                handler.close_connection = True
                return
            with self._lock:
                self.in_flight += 1
            try:
                status, headers, data = self._forward(handler, body)
            finally:
                with self._lock:
                    self.in_flight -= 1
            with self._lock:
                self.forwarded[path] += 1
                self.answered.append((path, body))
            if fault is not None and fault.kind == "rewrite" and status == 200:
                data = json.dumps(fault.rewrite(json.loads(data))).encode()
            announced = len(data)
            if fault is not None and fault.kind in ("truncate", "cut"):
                data = data[: len(data) // 2]
                if fault.kind == "truncate":
                    announced = len(data)
            handler.send_response(status)
            for k, v in headers:
                handler.send_header(k, v)
            handler.send_header("Content-Length", str(announced))
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
            handler.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (e.g. after a stall)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real llama-cpp-python server (bundled SmolLM2 GGUF) on 127.0.0.1, for the whole module."""
    why = server_available()
    if why:
        pytest.skip(why)
    with run_llama_server(tmp_path_factory.mktemp("llama_server")) as server:
        yield server


@pytest.fixture
def fault_proxy(llama_server):
    """A fresh fault-injecting, request-counting proxy in front of the module's server."""
    llama_server.assert_alive()
    proxy = FaultProxy(llama_server.port)
    try:
        yield proxy
    finally:
        proxy.close()
    llama_server.assert_alive()  # a test that crashed the server fails itself, not the next one

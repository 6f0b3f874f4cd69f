"""llama.cpp's own server as a `specdec bench` baseline: the `llama-server-<mode>` methods.

This module owns those methods: their names, finding the `llama-server` binary ($SPECDEC_LLAMA_SERVER, else
PATH), starting one server per method on 127.0.0.1 (a free port, `-np 1`, the bench's thread count), waiting
until it answers, timing greedy completions of the token ids specdec's tokenizer produced, and stopping every
server when the bench ends. Modes:

- `plain`: no speculation; what the other modes' outputs must equal (`own_plain`).
- `ngram-simple`, `ngram-map-k`, `ngram-map-k4v`, `ngram-mod`, `ngram-cache`: `--spec-type <mode>`.
- `draft`: a draft model (`--spec-type draft-simple --model-draft`, the bench's `--llama-draft`: a built-in name or a .gguf file).

A request is what a llama.cpp user's client sends: {"prompt": [ids], "n_predict", "temperature": 0, "top_k": 1,
"cache_prompt": false, "return_tokens": true}; the time is the request's wall time (prefill included, as every
bench method's). The server stops at its own end-of-generation tokens; the reply is cut at the bench's EOS ids.

The binary is built from the llama.cpp tree vendored in llama-cpp-python's sdist (`BUILD`, ~7 minutes on two
cores); nothing here runs unless a llama-server method is asked for, and never in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specdec.errors import SpecdecError

PREFIX = "llama-server-"
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
MODES = ("plain", *NGRAM_TYPES, "draft")
METHODS = tuple(PREFIX + m for m in MODES)
ENV = "SPECDEC_LLAMA_SERVER"
BUILD = ("pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz "
         "&& cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX2=ON "
         "-DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build "
         "--target llama-server -j2")
READY_S = 180.0  # a server that does not answer /health by then is reported with its log


def is_server_method(name: str) -> bool:
    return name.startswith(PREFIX)


def check_methods(methods: tuple[str, ...], draft: str | None) -> list[str]:
    """The llama-server modes among `methods`; SpecdecError (one line) for an unknown mode, a missing binary or
    a draft mode without a draft model."""
    modes = [m[len(PREFIX):] for m in methods if is_server_method(m)]
    for mode in modes:
        if mode not in MODES:
            raise SpecdecError(f"unknown llama-server method '{PREFIX}{mode}': use one of {', '.join(METHODS)}")
    if "draft" in modes and not draft:
        raise SpecdecError(f"{PREFIX}draft needs a draft model: add --llama-draft MODEL (a built-in name such as "
                           "qwen2.5-coder-0.5b, or a .gguf file)")
    if modes:
        binary()
    return modes


def binary() -> Path:
    """The llama-server executable: $SPECDEC_LLAMA_SERVER, else `llama-server` on PATH."""
    given = os.environ.get(ENV)
    found = Path(given).expanduser() if given else (Path(p) if (p := shutil.which("llama-server")) else None)
    if found is None or not found.is_file() or not os.access(found, os.X_OK):
        where = f"{ENV}={given} is not an executable file" if given else "llama-server is not on PATH"
        raise SpecdecError(f"the llama-server-* bench methods need llama.cpp's server, and {where}: build it with "
                           f"`{BUILD}` and set {ENV}=<that folder>/build/bin/llama-server")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Server:
    mode: str
    args: list[str]  # the command line it was started with
    port: int
    process: subprocess.Popen
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class ServerRunner:
    """One llama-server per mode, started once for the whole bench and stopped by `close` (a context manager)."""

    def __init__(self, modes: list[str], gguf: Path, draft_gguf: Path | None, threads: int, n_ctx: int,
                 log: Callable[[str], None], parallel: int = 1):
        self.binary, self.threads, self.parallel = binary(), threads, parallel
        self.logs = Path(tempfile.mkdtemp(prefix="specdec-llama-server-"))
        self.servers: dict[str, _Server] = {}
        try:
            for mode in modes:
                extra = ["--spec-type", mode] if mode in NGRAM_TYPES else []
                if mode == "draft":
                    extra = ["--spec-type", "draft-simple", "--model-draft", str(draft_gguf), "--threads-draft", str(threads)]
                log(f"starting llama-server ({mode}) on {gguf.name}...")
                self.servers[mode] = self._start(mode, gguf, extra, n_ctx)
        except BaseException:
            self.close()
            raise

    def _start(self, mode: str, gguf: Path, extra: list[str], n_ctx: int) -> _Server:
        port = _free_port()
        # -c is the whole context, shared by the -np slots: each slot gets n_ctx
        args = [str(self.binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
                "-tb", str(self.threads), "-c", str(n_ctx * self.parallel), "-np", str(self.parallel), *extra]
        log_path = self.logs / f"{mode}.log"
        with open(log_path, "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = _Server(mode, args, port, process, log_path)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SpecdecError(f"llama-server ({mode}) exited with status {process.returncode} at start: "
                                   f"{self._tail(server)}")
            try:
                with urllib.request.urlopen(server.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        process.kill()
        raise SpecdecError(f"llama-server ({mode}) did not answer within {READY_S:.0f} s: {self._tail(server)}")

    @staticmethod
    def _tail(server: _Server) -> str:
        lines = server.log_path.read_text(errors="replace").strip().splitlines()
        return " / ".join(lines[-3:]) if lines else f"no output (log {server.log_path})"

    def describe(self) -> dict:
        """What the saved report states: the command line of each server."""
        return {"llama_server": {mode: " ".join(s.args) for mode, s in self.servers.items()}}

    def generate(self, method: str, ids: list[int], max_new: int, eos: list[int]) -> tuple[list[int], float]:
        """Greedy continuation of `ids` by the method's server: (new tokens, cut after the first EOS; seconds)."""
        server = self.servers[method[len(PREFIX):]]
        body = json.dumps({"prompt": ids, "n_predict": max_new, "temperature": 0.0, "top_k": 1, "top_p": 1.0,
                           "min_p": 0.0, "repeat_penalty": 1.0, "cache_prompt": False, "return_tokens": True,
                           "stream": False}).encode()
        request = urllib.request.Request(server.url("/completion"), data=body,
                                         headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                reply = json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise SpecdecError(f"llama-server ({server.mode}) failed a request ({e}): {self._tail(server)}") from None
        seconds = time.perf_counter() - t0
        tokens = [int(t) for t in reply.get("tokens", [])][:max_new]
        stop = set(eos)
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
        return tokens[:cut], seconds

    def generate_many(self, method: str, prompts: list[list[int]], max_new: int, eos: list[int],
                      in_flight: int) -> list[list[int]]:
        """Every prompt's greedy continuation, `in_flight` requests at a time (a server started with as many
        slots: `parallel`), in prompt order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            return [tokens for tokens, _ in pool.map(lambda ids: self.generate(method, ids, max_new, eos), prompts)]

    def close(self) -> None:
        for server in self.servers.values():
            if server.process.poll() is None:
                server.process.terminate()
                try:
                    server.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.process.kill()
                    server.process.wait()
        self.servers = {}

    def __enter__(self) -> "ServerRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

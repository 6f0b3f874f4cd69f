"""The llama-server bench methods: names, one-line errors, and the runner against a stand-in server (a small
Python HTTP server with llama-server's command line and /health + /completion replies), so no llama.cpp build is
needed here."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from specdec.bench import llama_cpp, llama_server
from specdec.bench.spec_bench import is_baseline, own_plain
from specdec.errors import SpecdecError

FAKE = '''#!{python}
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
with open({record!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "--fail" in args or {fail}:
    print("error: model file is broken", flush=True)
    sys.exit(3)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._send({{"status": "ok"}})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # continue the prompt with its last id + 1, + 2, ...; id 7 plays the end of generation
        last = req["prompt"][-1]
        self._send({{"tokens": [last + 1 + i for i in range(req["n_predict"])], "request": req}})
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _fake(tmp_path: Path, fail: bool = False) -> tuple[Path, Path]:
    exe, record = tmp_path / "llama-server", tmp_path / "calls.jsonl"
    exe.write_text(FAKE.format(python=sys.executable, record=str(record), fail=fail))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe, record


def test_method_names_are_the_servers_not_llama_cpp_pythons():
    assert llama_server.is_server_method("llama-server-ngram-mod")
    assert not llama_cpp.is_llama_method("llama-server-ngram-mod") and llama_cpp.is_llama_method("llama-q4km-plain")
    assert is_baseline("llama-server-plain") and not is_baseline("ngram@gguf")
    assert own_plain("llama-server-ngram-mod") == "llama-server-plain"


def test_unknown_mode_missing_binary_and_missing_draft_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(llama_server.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SpecdecError, match="unknown llama-server method 'llama-server-ngram-foo'"):
        llama_server.check_methods(("plain", "llama-server-ngram-foo"), None)
    with pytest.raises(SpecdecError, match="needs a draft model: add --llama-draft"):
        llama_server.check_methods(("llama-server-draft",), None)
    with pytest.raises(SpecdecError, match="is not an executable file: build it with `pip download"):
        llama_server.check_methods(("llama-server-plain",), None)
    assert llama_server.check_methods(("plain", "ngram@gguf"), None) == []  # no server method: nothing checked


def test_runner_starts_one_server_per_mode_sends_ids_and_cuts_at_eos(tmp_path, monkeypatch):
    exe, record = _fake(tmp_path)
    monkeypatch.setenv(llama_server.ENV, str(exe))
    gguf, draft = tmp_path / "m.gguf", tmp_path / "d.gguf"
    with llama_server.ServerRunner(["plain", "ngram-mod", "draft"], gguf, draft, threads=2, n_ctx=300,
                                   log=lambda _: None) as runner:
        tokens, seconds = runner.generate("llama-server-ngram-mod", [1, 2, 3], 10, eos=[7])
        assert tokens == [4, 5, 6, 7] and seconds > 0  # cut after the bench's EOS id, which is kept
        tokens, _ = runner.generate("llama-server-plain", [20], 3, eos=[7])
        assert tokens == [21, 22, 23]
        many = runner.generate_many("llama-server-plain", [[10 * i] for i in range(7)], 2, [7], in_flight=3)
        assert many == [[10 * i + 1, 10 * i + 2] for i in range(7)]  # in prompt order, whatever finished first
        processes = [s.process for s in runner.servers.values()]
        assert set(runner.describe()["llama_server"]) == {"plain", "ngram-mod", "draft"}
    assert all(p.poll() is not None for p in processes)  # stopped on leaving the block
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    by_mode = {("ngram-mod" if "ngram-mod" in c else "draft" if "--model-draft" in c else "plain"): c for c in calls}
    assert len(calls) == 3 and "--spec-type" not in by_mode["plain"]
    assert by_mode["draft"][by_mode["draft"].index("--model-draft") + 1] == str(draft)
    for c in calls:
        assert c[c.index("-m") + 1] == str(gguf) and c[c.index("-t") + 1] == "2" and c[c.index("-np") + 1] == "1"


def test_a_server_that_dies_at_start_is_reported_with_its_last_lines(tmp_path, monkeypatch):
    exe, _ = _fake(tmp_path, fail=True)
    monkeypatch.setenv(llama_server.ENV, str(exe))
    with pytest.raises(SpecdecError, match=r"exited with status 3 at start: error: model file is broken"):
        llama_server.ServerRunner(["plain"], tmp_path / "m.gguf", None, threads=1, n_ctx=64, log=lambda _: None)

"""The llama.cpp baselines of `specdec bench`: method names, the one-line error when llama-cpp-python is missing,
the "= own plain" exact-match column (each method against its own system's plain decoding), and, when
llama_cpp is installed and the default model is cached, a 1-prompt 16-token smoke run on the real model."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from specdec.bench.llama_cpp import METHODS, LlamaMethod, check_methods, is_llama_method, parse_method
from specdec.bench.spec_bench import Row, own_plain, summarise
from specdec.cli import main
from specdec.errors import SpecdecError


def test_method_names_parse():
    assert METHODS == ("llama-q4km-plain", "llama-q4km-pld", "llama-f32-plain", "llama-f32-pld")
    assert parse_method("llama-f32-pld") == LlamaMethod("llama-f32-pld", "f32", pld=True)
    assert parse_method("llama-q4km-plain") == LlamaMethod("llama-q4km-plain", "q4km", pld=False)
    assert parse_method("llama-q4km-pld").plain == "llama-q4km-plain"
    assert [is_llama_method(m) for m in ("llama-f32-plain", "plain", "hf-pld", "recycling")] == [1, 0, 0, 0]
    for bad in ("llama-q8-plain", "llama-q4km", "llama-q4km-tree", "llama-", "llama-f32-pld-x"):
        with pytest.raises(SpecdecError, match=f"unknown llama.cpp method '{bad}': use one of llama-q4km-plain, "):
            parse_method(bad)


def test_missing_llama_cpp_is_one_line_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    assert check_methods(("hf-plain", "plain", "ngram")) == []  # no llama method: llama_cpp is never imported
    with pytest.raises(SpecdecError) as err:
        check_methods(("plain", "llama-q4km-pld"))
    msg = str(err.value)
    assert "\n" not in msg and "llama-cpp-python, which is not installed" in msg
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF ' in msg and 'pip install "llama-cpp-python>=0.3"' in msg
    # the CLI says the same in one line, before loading any model (this one does not exist)
    res = CliRunner().invoke(main, ["bench", "--model", str(tmp_path / "no-such-model"), "--methods",
                                    "hf-plain,llama-f32-plain", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"error: {msg}"


def test_own_plain_of_each_system():
    assert [own_plain(m) for m in ("hf-plain", "hf-pld", "plain", "ngram", "recycling")] == \
        ["hf-plain", "hf-plain", "plain", "plain", "plain"]
    assert [own_plain(m) for m in METHODS] == ["llama-q4km-plain"] * 2 + ["llama-f32-plain"] * 2


def _row(qid: int, method: str, tokens: list[int], seconds: float = 1.0) -> Row:
    return Row(qid, "cat", method, prompt_tokens=3, new_tokens=len(tokens), seconds=seconds, tau=float("nan"),
               tokens=tokens, prompt=[1, 2, 3])


def test_own_plain_column_on_synthetic_rows():
    methods = ("hf-plain", "hf-pld", "plain", "ngram", "llama-q4km-plain", "llama-q4km-pld", "llama-f32-pld")
    outputs = {  # method: (question 1's tokens, question 2's tokens)
        "hf-plain": ([5, 6, 7], [8, 9]),
        "hf-pld": ([5, 6, 7], [8, 0]),  # q2 differs from hf-plain: own 50%, vs baseline 50%
        "plain": ([5, 6, 4], [8, 9]),  # q1 differs from hf-plain; is its own plain
        "ngram": ([5, 6, 4], [8, 9]),  # equals specdec plain (100% own) though not hf-plain on q1 (50%)
        "llama-q4km-plain": ([5, 1, 1], [8, 9]),
        "llama-q4km-pld": ([5, 1, 1], [8, 2]),  # q2 differs from llama-q4km-plain: own 50%
        "llama-f32-pld": ([5, 6, 7], [8, 9]),  # its plain (llama-f32-plain) did not run: no own match
    }
    rows = [_row(q, m, toks[q - 1]) for m, toks in outputs.items() for q in (1, 2)]
    report = summarise(rows, methods, {"prompts": 2, "max_new_tokens": 3, "model": "m", "dtype": "float32",
                                       "cpu": "c", "threads": 1, "torch": "t", "transformers": "x"})
    overall = report["table"]["overall"]
    own = {m: overall[m]["own_exact"] for m in methods}
    nan = [m for m, v in own.items() if v != v]
    assert sorted(nan) == ["hf-plain", "llama-f32-pld", "llama-q4km-plain", "plain"]  # plain itself, or plain absent
    assert {m: v for m, v in own.items() if v == v} == {"hf-pld": 0.5, "ngram": 1.0, "llama-q4km-pld": 0.5}
    assert [overall[m]["exact_match"] for m in methods] == [1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0]
    assert overall["llama-q4km-pld"]["own_plain"] == "llama-q4km-plain"
    md = report["markdown"]
    assert "| llama-q4km-pld exact | llama-q4km-pld = own plain |" in md
    overall_line = next(line for line in md.splitlines() if line.startswith("| **overall**"))
    cells = [c.strip() for c in overall_line.strip("|").split("|")][1:]
    assert len(cells) == 5 * len(methods)
    assert [cells[5 * i + 4] for i in range(len(methods))] == ["-", "50%", "-", "100%", "-", "50%", "-"]
    assert "drafting with ngram" in md and "drafting with llama" not in md  # gain split: specdec drafters only
    assert {(m["question_id"], m["method"]) for m in report["mismatches"]} == {
        (2, "hf-pld"), (1, "plain"), (1, "ngram"), (1, "llama-q4km-plain"), (1, "llama-q4km-pld"),
        (2, "llama-q4km-pld")}


def _default_model_cached() -> bool:
    from specdec.models.builtin import BUILTINS, DEFAULT_BUILTIN, missing_distributions
    from specdec.models.loading import cache_root

    builtin = BUILTINS[DEFAULT_BUILTIN]
    return (cache_root() / "models" / builtin.name).is_dir() and not missing_distributions(builtin)


@pytest.mark.slow
def test_llama_smoke_on_the_real_default_model(tmp_path):
    pytest.importorskip("llama_cpp")
    if not _default_model_cached():
        pytest.skip("the default model is not cached (run `specdec generate` once)")
    from specdec.bench.spec_bench import BenchSpec, run_bench
    from specdec.data.spec_bench import read_questions

    q = read_questions(limit=1)[0]
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"question_id": q["question_id"], "category": q["category"], "turns": [q["text"]]}))
    methods = ("hf-plain", "llama-q4km-plain", "llama-q4km-pld")
    report = run_bench(BenchSpec(prompts=str(prompts), max_new_tokens=16, methods=methods,
                                 out_dir=str(tmp_path / "out")), log=lambda _: None, echo=lambda _: None)
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    plain, pld = rows["llama-q4km-plain"], rows["llama-q4km-pld"]
    assert plain["new_tokens"] == len(plain["tokens"]) == 16 and plain["seconds"] > 0
    assert saved["info"]["llama_cpp"] and set(saved["info"]["llama_files"]) == {"q4km"}
    overall = report["table"]["overall"]
    same = pld["tokens"] == plain["tokens"]  # equal, or reported as not equal: the report matches the rows
    assert overall["llama-q4km-pld"]["own_exact"] == float(same)
    for m in ("llama-q4km-plain", "llama-q4km-pld"):
        assert overall[m]["exact_match"] == float(rows[m]["tokens"] == rows["hf-plain"]["tokens"])
    flagged = {m["method"] for m in report["mismatches"]}
    assert flagged == {m for m in methods[1:] if rows[m]["tokens"] != rows["hf-plain"]["tokens"]}

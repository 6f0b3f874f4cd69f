#!/usr/bin/env bash
# GPU check (issue "one loop ... device"): on a machine with a CUDA GPU, in under 8 minutes,
#   1. the CUDA tests (kernel against the reference, the one loop on cuda),
#   2. the triton tree-attention kernel against SDPA with a mask (accuracy and ms),
#   3. a 5-prompt end-to-end equivalence check per architecture (greedy = transformers generate(), sampled =
#      plain sampling), and prints ONE summary table.
# Offline machines: torch, triton and transformers are taken as installed (torch 2.11 / triton 3.6 / transformers
# 5.17 work); nothing is downloaded. Packages it lacks (numba, llvmlite, pytest, ...) are installed with
# --no-index from ./wheels when that folder was brought along (make it where the registry is reachable:
#   pip download --no-deps -d wheels numba llvmlite pytest pluggy iniconfig click gguf --python-version 3.X
# for the GPU machine's Python). specdec itself runs from the checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp}/gpu_check"
mkdir -p "$out"
python - <<'PY'
import importlib, subprocess, sys, glob
need = {"numba": "numba", "llvmlite": "llvmlite", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig",
        "click": "click", "yaml": "pyyaml", "gguf": "gguf", "safetensors": "safetensors", "tokenizers": "tokenizers"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
wheels = [w for w in glob.glob("wheels/*.whl") if any(w.split("/")[-1].lower().startswith(p.replace("-", "_")) for p in missing)]
if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wheels], check=False)
still = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
print("missing after wheels:", still or "none")
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")
PY
timeout 300 python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_tree_attention.py tests/test_one_loop.py -k "cuda" > "$out/pytest.txt" 2>&1
tests_rc=$?
timeout 240 python scripts/gpu_check.py > "$out/checks.jsonl" 2> "$out/checks.err"
checks_rc=$?
echo
echo "| check | result | detail |"
echo "|---|---|---|"
echo "| CUDA tests (pytest -k cuda) | $([ $tests_rc -eq 0 ] && echo pass || echo FAIL) | $(tail -1 "$out/pytest.txt") |"
python - "$out/checks.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(f"| {r['check']} | {r['result']} | {r['detail']} |")
PY
[ $checks_rc -eq 0 ] || { echo "| gpu_check.py | FAIL (rc $checks_rc) | $(tail -1 "$out/checks.err") |"; }
[ $tests_rc -eq 0 ] && [ $checks_rc -eq 0 ]

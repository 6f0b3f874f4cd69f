"""The API rows of bad-inputs-before-after.md: `python results/bad_inputs_api_cases.py new`, or
`python results/bad_inputs_api_cases.py old OLD_CHECKOUT` to import another checkout's specdec instead."""
import sys
from pathlib import Path

if sys.argv[1] == "old":  # bypass the editable install of this checkout
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
    sys.path.insert(0, sys.argv[2])
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
import specdec
from conftest import make_tiny_model, make_tiny_tokenizer
from specdec.errors import SpecdecError
m = make_tiny_model("llama")
dec = specdec.SpecDecoder(m, make_tiny_tokenizer(), drafter="ngram", backend="lean")
cases = [
    ("max_new_tokens=None", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=None)),
    ("max_new_tokens=8.5", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=8.5)),
    ("temperature='0.5'", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=4, temperature="0.5")),
    ("temperature=nan", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=4, temperature=float("nan"))),
    ("float token ids [5.0, 6.7]", lambda: dec.generate_ids([5.0, 6.7], max_new_tokens=2)),
    ("eos_token_id=-5", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=4, eos_token_id=-5)),
    ("stop_strings=['']", lambda: dec.generate_ids([5, 6, 7], max_new_tokens=4, stop_strings=[""])),
    ("generate(do_sample=True, temperature=0)", lambda: specdec.generate(dec, torch.tensor([[5, 6]]), do_sample=True, temperature=0.0, max_new_tokens=3)),
    ("generate(SpecDecoder, drafter='plain')", lambda: specdec.generate(dec, torch.tensor([[5, 6]]), drafter="plain", max_new_tokens=3)),
    ("SpecDecoder(drafter=123)", lambda: specdec.SpecDecoder(m, drafter=123)),
]
print(f"| API input | {sys.argv[1]} |\n|---|---|")
for name, fn in cases:
    try:
        fn()
        got = "no error (silently accepted)"
    except SpecdecError as err:
        got = f"SpecdecError: {str(err)[:70]}"
    except Exception as err:
        got = f"{type(err).__name__} (traceback): {str(err)[:50]}"
    print(f"| {name} | {got.replace('|', '/')} |")

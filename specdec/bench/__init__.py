"""Benchmarks: every number comes with its machine, dtype, threads and prompt count, and is saved, never overwritten.

- `spec_bench`: `specdec bench`, Spec-Bench side by side at batch 1 (transformers baselines and specdec
  drafters, interleaved by prompt); also the shared `Row`, `summarise`, `eos_ids`, `hf_generate`.
- `batch`: `specdec bench --batch 1,2,4,8`, batched throughput, plain vs speculative, on the batch engine.
- `pairs`: `python -m specdec.bench.pairs`, the model-based drafters (`model`, `self`) against the baselines.
- `verify_curve`: `python -m specdec.bench.verify_curve`, milliseconds to score k nodes per verifier variant.
- `plots`: PNG plots of a Spec-Bench report and a verify curve (matplotlib).
- `report`: machine info, the results folder check at start, JSON + Markdown files written without overwriting.

The Spec-Bench questions are read by `specdec.data.spec_bench.read_questions`; prompts are encoded by
`specdec.text.encode_prompt`; "is the machine busy" is `specdec.measured`.
"""

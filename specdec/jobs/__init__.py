"""Batch jobs: a JSONL file of prompts in, a JSONL file of results out, resumable after `kill -9`.

- `rows`: the input format; parsing (`read_input`) and per-row checks (`row_options`, `derived_seed`).
- `output`: the append-only, fsync'ed, locked output file (`OutputFile`) and its recovery after a crash.
- `worker`: `JobRunner` (model + batch engine: rows in, records out), what each process or actor runs.
- `runner`: `run_job`, the whole job (reads the input, writes the output, local or on Ray).
- `ray_runner`: the same rows decoded by N Ray actors (`run_on_ray`; optional dependency ray).
- `cli`: the `specdec batch` command.
"""

from specdec.jobs.output import OutputFile
from specdec.jobs.rows import JobRow, derived_seed, key, read_input, row_options
from specdec.jobs.runner import JobSummary, run_job
from specdec.jobs.worker import JobRunner, JobSettings

__all__ = ["JobRow", "JobRunner", "JobSettings", "JobSummary", "OutputFile", "derived_seed", "key", "read_input",
           "row_options", "run_job"]

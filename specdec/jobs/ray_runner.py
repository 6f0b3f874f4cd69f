"""The batch job on Ray (optional dependency: ``pip install 'specdec[ray]'``).

One `JobRunner` (model + batch engine) per Ray actor; the rows still to do are sharded round-robin across
the actors, and each actor streams its output records back as its rows finish (a Ray streaming generator).
The driver alone reads the input and writes the output (`specdec.jobs.runner`), so resuming after a kill works
exactly as in a single process, and since a row's tokens depend only on its prompt and seed, the output is
the single-process run's, row for row. Without a running cluster (RAY_ADDRESS unset) a local one is started
with one CPU per worker and stopped afterwards.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from specdec.errors import SpecdecError
from specdec.jobs.rows import JobRow
from specdec.jobs.worker import JobRunner, JobSettings


class JobWorker:
    """The actor: builds its engine once, then decodes the shards it is given."""

    def __init__(self, settings: JobSettings, threads: int):
        from specdec.hardware import set_threads

        set_threads(threads)
        self.runner, self.error = None, None
        try:
            self.runner = JobRunner(settings)
        except SpecdecError as err:  # reported by ready(), as the user's one-line error
            self.error = str(err)

    def ready(self) -> str | None:
        """None once the engine is built, else why it could not be."""
        return self.error

    def run(self, rows: list[JobRow]) -> Iterator[dict]:
        yield from self.runner.run(rows)


def run_on_ray(rows: list[JobRow], settings: JobSettings, workers: int,
               log: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Output records of `rows`, decoded by `workers` actors, in the order they arrive."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(num_cpus=max(workers, os.cpu_count() or 1) if local else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    threads = settings.config.threads or max(1, (os.cpu_count() or 1) // workers)
    actor = ray.remote(num_cpus=1)(JobWorker)
    actors = [actor.remote(settings, threads) for _ in range(min(workers, len(rows)))]
    try:
        errors = [e for e in ray.get([a.ready.remote() for a in actors]) if e]
        if errors:
            raise SpecdecError(errors[0])
        if log:
            log(f"ray: {len(actors)} workers, {threads} torch threads each, {len(rows)} rows")
        streams = [a.run.options(num_returns="streaming").remote(rows[i:: len(actors)])
                   for i, a in enumerate(actors)]
        while streams:
            ready, _ = ray.wait(streams, num_returns=1)
            for stream in ready:
                try:
                    ref = next(stream)
                except StopIteration:
                    streams.remove(stream)
                    continue
                yield _get(ray, ref)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def _get(ray, ref) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # a worker failed: surface its own error
        cause = err.as_instanceof_cause()
        if isinstance(cause, SpecdecError):
            raise SpecdecError(str(cause)) from None
        raise


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SpecdecError("--ray needs Ray: pip install 'specdec[ray]' (or pip install ray)") from None
    return ray

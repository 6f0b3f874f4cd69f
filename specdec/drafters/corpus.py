"""Training data for drafters trained here (diffusion, lexical): the target's own greedy continuations of
`specdec.drafters.training_prompts`, and the head vocabulary drafters restrict the target's LM head to.

`generate_corpus` decodes the prompts with the target (greedy, through the one loop with the exact n-gram
drafter, so the text is plain decoding's) and appends one JSON line per prompt to a file: {"prompt": text,
"prompt_ids": [...], "output_ids": [...]}. Lines are written in chunks, flushed and fsynced; a rerun skips the
prompts already there, so a killed run resumes where it stopped. `read_corpus` reads it back (a torn last line
is dropped and redone on the next run). `extend_corpus` keeps a corpus in a repository: complete files of
CHUNK_ROWS rows, gzip-compressed JSON lines (`pack_corpus`), the unfinished tail in a live file outside it.

Before a run, `prepare_work_dir` checks the work dir and the output can be written and that the work dir was
made for this model; `check_rows` and `check_enough` check the corpus's rows and that there are enough of them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from specdec.bench.spec_bench import PROMPT_TEMPLATE
from specdec.drafters.training_prompts import training_prompts
from specdec.errors import SpecdecError
from specdec.text import encode_prompt


MIN_SEQUENCES = 4  # corpus rows with at least 2 output tokens (a root and one label) a training run needs


def training_decoder(model: str, cache_dir: str | None, log: Callable[[str], None] | None = None):
    """The target a trained drafter learns from: its fp32 weights loaded (the drafter copies its embedding and
    last layers, which a natively loaded GGUF keeps quantised), verified in the format `weights=auto` picks for
    `model`, the one the drafter's hidden states come from at inference (a drafter that computes with the
    target's weights loads it the same way: `specdec.plan`'s load "dequantised")."""
    from specdec.api import SpecDecoder, default_weights, gguf_weights
    from specdec.models.loading import load_model

    weights = default_weights(model, cache_dir=cache_dir)
    loaded = load_model(model, cache_dir=cache_dir, log=log)
    quant = gguf_weights(model, loaded.model, cache_dir, log) if weights == "gguf" else None
    return SpecDecoder(loaded, drafter="ngram", cache_dir=cache_dir, log=log, weights=weights, quant=quant)


def prepare_work_dir(work: Path, out: Path, decoder) -> None:
    """Before training: `work` and `out`'s folder can be written, and `work` was made for this model. The first
    run stamps it (`target.json`: the model's shape, vocabulary size and a fingerprint of its tokenizer), later
    runs must match, so another model's corpus, features or checkpoints are never trained on. A corpus from
    before stamps is checked row by row (`check_rows`) instead. SpecdecError (one line) otherwise."""
    _writable_dir(work, "--work-dir")
    _writable_dir(out.parent, "the folder of --out")
    if out.exists() and (not out.is_file() or not os.access(out, os.W_OK)):
        what = "read-only" if out.is_file() else "a folder" if out.is_dir() else "not a regular file"
        raise SpecdecError(f"--out {out} cannot be written ({what}): give a writable file path")
    stamp, mine = work / "target.json", target_stamp(decoder)
    if stamp.is_file():
        try:
            theirs = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = None
        if theirs != mine:
            made = _describe(theirs) if isinstance(theirs, dict) else "a damaged stamp"
            raise SpecdecError(f"the work dir {work} was made for another model ({made}), not this one "
                               f"({_describe(mine)}): give a new --work-dir, or empty {work}")
        return
    check_rows(read_corpus(work / "corpus.jsonl"), mine["vocab_size"], work / "corpus.jsonl")
    try:
        stamp.write_text(json.dumps(mine))
    except OSError as err:
        raise SpecdecError(f"cannot write {stamp} ({err.strerror}): give a writable --work-dir") from None


@contextlib.contextmanager
def writing_output(out: Path) -> Iterator[None]:
    """Around writing the weights file at the end of training: a write error (disk full, read-only) is one line;
    the final checkpoint stays in the work dir, so a rerun only writes the file."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
        raise SpecdecError(f"cannot write --out {out} ({reason}): free space or give a writable path, then run the "
                           "same command again (training resumes from its last checkpoint)") from None


def target_stamp(decoder) -> dict:
    """What a work dir is made for: the target's architecture, shape, vocabulary size and tokenizer."""
    cfg = decoder.model.config
    tok = getattr(decoder, "tokenizer", None)
    vocab = sorted(tok.get_vocab().items()) if tok is not None else []
    return {"model_type": cfg.model_type, "hidden_size": int(cfg.hidden_size),
            "num_hidden_layers": int(cfg.num_hidden_layers), "vocab_size": int(cfg.vocab_size),
            "tokenizer": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]}


def _describe(stamp: dict) -> str:
    return (f"{stamp.get('model_type')}, hidden {stamp.get('hidden_size')}, {stamp.get('num_hidden_layers')} "
            f"layers, vocabulary {stamp.get('vocab_size')}, tokenizer {stamp.get('tokenizer')}")


def _writable_dir(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SpecdecError(f"{flag} {path} cannot be written ({err.strerror or err}): give a writable folder") from None


def check_rows(rows: list, vocab_size: int, path: Path) -> None:
    """SpecdecError (one line, naming the line) unless every corpus row is {"prompt": text, "prompt_ids": [ids,
    at least one], "output_ids": [ids]} with every id in 0..vocab_size - 1."""
    for line, row in enumerate(rows, 1):
        problem = None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            problem = "not a {\"prompt\", \"prompt_ids\", \"output_ids\"} row"
        else:
            for key in ("prompt_ids", "output_ids"):
                ids = row.get(key)
                if not isinstance(ids, list) or (key == "prompt_ids" and not ids):
                    problem = f"{key} is {'missing' if ids is None else 'not a list of token ids'}"
                elif any(type(t) is not int or not 0 <= t < vocab_size for t in ids):
                    problem = f"{key} holds values that are not token ids of this model (0..{vocab_size - 1})"
                if problem:
                    break
        if problem:
            raise SpecdecError(f"the corpus {path}, line {line}: {problem}: delete it to make it again, or give a "
                               "new --work-dir")


def check_enough(rows: list[dict], path: Path, minimum: int = MIN_SEQUENCES) -> None:
    """SpecdecError unless `minimum` rows have at least 2 output tokens (what a training step samples from)."""
    usable = sum(1 for r in rows if len(r["output_ids"]) >= 2)
    if usable < minimum:
        raise SpecdecError(f"the corpus {path} has {usable} sequences with 2 or more output tokens; training needs at "
                           f"least {minimum}: raise --prompts or --max-new-tokens")


def read_corpus(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: dropped, regenerated
            break
    return rows


def generate_corpus(decoder, path: str | Path, count: int, max_new_tokens: int = 128, chunk: int = 16,
                    width: int = 4, log: Callable[[str], None] = print, skip: set[str] = frozenset(),
                    after_chunk: Callable[[], None] | None = None) -> list[dict]:
    """The target's greedy outputs on `count` training prompts, appended to `path` (resumable); prompts in
    `skip` (already stored elsewhere) are not decoded; `after_chunk` runs after each fsynced chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_corpus(path)
    check_rows(done, int(decoder.model.config.vocab_size), path)
    with path.open("w", encoding="utf-8") as f:  # rewrite the intact prefix (drops a torn tail)
        for row in done:
            f.write(json.dumps(row) + "\n")
    have = {r["prompt"] for r in done} | set(skip)
    todo = [p for p in training_prompts(count) if p not in have]
    t0, tokens = time.perf_counter(), 0
    for begin in range(0, len(todo), chunk):
        part = todo[begin: begin + chunk]
        ids = [encode_prompt(decoder.tokenizer, p, template=PROMPT_TEMPLATE) for p in part]
        result = decoder.generate_many(ids, width=width, max_new_tokens=max_new_tokens)
        with path.open("a", encoding="utf-8") as f:
            for p, i, r in zip(part, ids, result.results):
                f.write(json.dumps({"prompt": p, "prompt_ids": i, "output_ids": list(r.tokens)}) + "\n")
                tokens += len(r.tokens)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
        log(f"corpus: {len(have) + begin + len(part)}/{len(have) + len(todo)} prompts, {tokens} new tokens, "
            f"{tokens / max(elapsed, 1e-9):.1f} tok/s")
        if after_chunk is not None:
            after_chunk()
    return read_corpus(path)


CHUNK_ROWS = 512  # rows of one packed corpus file


def packed_rows(folder: str | Path) -> list[dict]:
    """The rows of every packed file in `folder` (`corpus-NNNNN.jsonl.gz`, in order); [] for none."""
    rows: list[dict] = []
    for f in sorted(Path(folder).glob("corpus-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as lines:
            rows += [json.loads(line) for line in lines if line.strip()]
    return rows


def pack_corpus(live: Path, folder: Path, chunk_rows: int = CHUNK_ROWS) -> int:
    """Move the first `chunk_rows` rows of the `live` corpus file into the next packed file of `folder` while it
    has that many (each file written to a temporary name, fsynced and renamed; then `live` is rewritten without
    them, also by rename): what a repository keeps. A kill between the two renames leaves those rows in both,
    which `extend_corpus` drops from `live` on its next run. Returns the rows packed."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, moved = read_corpus(live), 0
    while len(rows) - moved >= chunk_rows:
        index = len(list(folder.glob("corpus-*.jsonl.gz")))
        part = rows[moved: moved + chunk_rows]
        target = folder / f"corpus-{index:05d}.jsonl.gz"
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as z:
                z.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in part).encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
        moved += chunk_rows
    if moved:
        _rewrite(live, rows[moved:])
    return moved


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def extend_corpus(decoder, folder: str | Path, live: str | Path, count: int, max_new_tokens: int, width: int,
                  log: Callable[[str], None] = print, chunk_rows: int = CHUNK_ROWS) -> list[dict]:
    """The corpus of `folder` (packed files, what the repository holds) extended to `count` training prompts:
    prompts already packed are skipped, new rows go to `live` (resumable, fsynced a chunk at a time) and every
    full `chunk_rows` of them is packed into `folder` as it is made. Returns every row, packed and live."""
    folder, live = Path(folder), Path(live)
    packed = packed_rows(folder)
    vocab = int(decoder.model.config.vocab_size)
    check_rows(packed, vocab, folder)
    stored = {r["prompt"] for r in packed}
    pending = read_corpus(live)
    if any(r["prompt"] in stored for r in pending):  # a kill between pack_corpus's two renames
        _rewrite(live, [r for r in pending if r["prompt"] not in stored])
    generate_corpus(decoder, live, count, max_new_tokens, chunk=4 * width, width=width, log=log, skip=stored,
                    after_chunk=lambda: pack_corpus(live, folder, chunk_rows))
    return packed_rows(folder) + read_corpus(live)


HELD_OUT_EVERY = 50  # one training prompt in this many (by its hash) is held out of training: never trained on


def held_out(prompt: str) -> bool:
    """Whether a corpus row's prompt belongs to the held-out slice: a pure function of its text (the same slice
    however the corpus grows or is ordered)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big") % HELD_OUT_EVERY == 0


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows to train on, the held-out rows)."""
    train = [r for r in rows if not held_out(r["prompt"])]
    return train, [r for r in rows if held_out(r["prompt"])]


def held_out_scores(seqs: list[list[int]], starts: list[int], rows: list[int],
                    right_of: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                    anchors: int = 32) -> tuple[float, float, int]:
    """(first-position top-1, tau, anchors) of a drafter on sequences `rows`: roots evenly spaced over each output
    (from `starts[i]`); right_of(i, seq [T], roots [A]) -> [A, k] bool, whether the drafter's top token at each of
    the k positions after a root is the target's; tau = 1 + the positions right in a row from the first, what a
    verify step would commit with that chain (bonus included)."""
    hits, taus, count = 0, 0.0, 0
    for i in rows:
        last = len(seqs[i]) - 2  # a root needs one label after it
        if last < starts[i]:
            continue
        roots = torch.tensor(sorted({round(starts[i] + (last - starts[i]) * a / max(1, anchors - 1))
                                     for a in range(anchors)}))
        right = right_of(i, torch.tensor(seqs[i]), roots)
        hits += int(right[:, 0].sum())
        taus += float((1 + right.int().cumprod(dim=1).sum(dim=1)).sum())
        count += int(roots.numel())
    return (hits / count, taus / count, count) if count else (0.0, 1.0, 0)


def corpus_rows(folder: str | Path, vocab_size: int) -> list[dict]:
    """The packed corpus of `folder` (what the repository keeps, `specdec train corpus`), every row checked;
    SpecdecError when it holds none."""
    folder = Path(folder)
    rows = packed_rows(folder)
    if not rows:
        raise SpecdecError(f"--corpus {folder} holds no corpus-*.jsonl.gz file: give the folder `specdec train "
                           "corpus --out` filled (the repository keeps corpus/<model>)")
    check_rows(rows, vocab_size, folder)
    return rows


def head_vocab(seqs: list[list[int]], size: int, eos: list[int]) -> torch.Tensor:
    """The `size` most frequent tokens of the corpus (EOS always in), ascending ids."""
    counts: dict[int, int] = {}
    for s in seqs:
        for t in s:
            counts[t] = counts.get(t, 0) + 1
    for t in eos:
        counts[t] = counts.get(t, 0) + 10 ** 9
    top = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(top), dtype=torch.long)

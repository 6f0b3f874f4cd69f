"""Training prompts for the drafters trained here: built from templates, word lists and the Python stdlib's own
docstrings, never from a benchmark.

Spec-Bench's 13 kinds of request (writing, roleplay, reasoning, math, coding, extraction, stem, humanities,
translation, summarization, qa, math reasoning, retrieval) each get templates filled from fixed lists; the
passages that extraction, summarization, translation and retrieval requests need are docstrings of stdlib
modules (`inspect.getdoc`), so the set is reproducible on one Python version and needs no download.
`training_prompts` drops every prompt that shares an 8-word run with a benchmark prompt (`overlaps`).
"""

from __future__ import annotations

import importlib
import json
import inspect
import random
import re
from typing import Iterable, Sequence

TOPICS = ("the ocean", "a lighthouse keeper", "autumn in the mountains", "a robot learning to paint", "city traffic",
          "an old library", "the first day of school", "a lost umbrella", "volcanoes", "a chess tournament",
          "a bakery at dawn", "migrating birds", "a desert caravan", "the night sky", "a small village festival",
          "electric cars", "a garden in spring", "a train journey", "a rainy afternoon", "a friendly dragon",
          "coffee", "the internet", "a mountain rescue", "ancient Rome", "a jazz musician", "honeybees",
          "a space station", "a quiet harbor", "winter sports", "a family recipe")
FORMS = ("short poem", "short story", "blog post", "persuasive paragraph", "product description", "letter to a friend",
         "haiku sequence", "news report", "diary entry", "speech")
ROLES = ("a ship captain", "a medieval blacksmith", "a detective", "a museum guide", "a personal trainer",
         "a chef", "a park ranger", "an astronaut", "a librarian", "a travel agent", "a history teacher", "a barista")
ASKS = ("Describe your typical day.", "What advice would you give a beginner?", "Tell me about your biggest challenge.",
        "What do you enjoy most about your work?", "Introduce yourself to a new visitor.")
CONCEPTS = ("photosynthesis", "gravity", "the water cycle", "plate tectonics", "how vaccines work", "entropy",
            "the speed of light", "DNA replication", "electric circuits", "black holes", "the greenhouse effect",
            "machine learning", "compound interest", "supply and demand", "the immune system", "magnetism",
            "sound waves", "the periodic table", "erosion", "nuclear fusion", "binary numbers", "encryption")
HISTORY = ("the printing press", "the Silk Road", "the Industrial Revolution", "the Renaissance", "ancient Egypt",
           "the invention of the telephone", "the Olympic Games", "the Great Wall of China", "the Age of Exploration",
           "the French Revolution", "the moon landing", "classical Greek philosophy")
CODE_TASKS = ("reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
              "counts the words in a text", "merges two sorted lists", "removes duplicates from a list",
              "computes the factorial of n", "finds the largest element of a list", "checks if a string is a palindrome",
              "converts Celsius to Fahrenheit", "flattens a nested list", "computes the mean of a list of numbers",
              "reads a CSV file and prints each row", "sorts a dictionary by its values", "implements binary search",
              "returns the greatest common divisor of two numbers", "counts vowels in a string",
              "transposes a matrix given as a list of lists", "validates an email address with a regex",
              "implements a stack class with push and pop")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
NAMES = ("Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
THINGS = ("a rainbow", "a leap year", "an atom", "a democracy", "a haiku", "a marathon", "an algorithm", "a glacier",
          "a symphony", "a vaccine", "an eclipse", "a bond in finance", "a noun", "a prime number", "a tsunami")
MODULES = ("json", "collections", "itertools", "functools", "re", "string", "textwrap", "datetime", "math",
           "statistics", "random", "heapq", "bisect", "csv", "pathlib", "shutil", "logging", "argparse", "typing",
           "dataclasses", "enum", "fractions", "decimal", "difflib", "html", "urllib.parse", "zipfile", "tarfile",
           "threading", "queue", "hashlib", "base64", "struct", "copy", "pprint", "calendar", "uuid", "inspect",
           "os.path", "glob", "tempfile", "contextlib", "operator", "abc", "io", "time", "socket", "email")


def passages(limit: int = 200) -> list[str]:
    """Paragraphs (80..700 characters) from stdlib docstrings, in a fixed order."""
    out: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                obj = getattr(module, attr, None)
                if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
                    docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                if 80 <= len(para) <= 700 and not para.startswith((">>>", "|")):
                    out.append(para)
    return list(dict.fromkeys(out))[:limit]


def _requests(rng: random.Random, texts: Sequence[str]) -> list[str]:
    out = []
    out += [f"Write a {f} about {t}." for f in FORMS for t in rng.sample(TOPICS, 4)]
    out += [f"Pretend you are {r}. {a}" for r in ROLES for a in rng.sample(ASKS, 2)]
    for _ in range(24):
        a, b = rng.sample(NAMES, 2)
        x, y = rng.randint(3, 40), rng.randint(1, 20)
        out.append(f"{a} has {x + y} marbles and gives {y} to {b}, who then doubles what {b} received. "
                   f"How many marbles does each person have now? Explain your reasoning.")
    for _ in range(24):
        a, b, c = rng.randint(2, 19), rng.randint(1, 60), rng.randint(61, 200)
        out.append(rng.choice((f"What is {a * 7} multiplied by {b}? Show your work.",
                               f"Solve for x: {a}x + {b} = {c}. Explain each step.",
                               f"A rectangle is {a} cm wide and {b} cm long. What are its area and perimeter?")))
    out += [f"Write a Python function that {t}." for t in CODE_TASKS]
    out += [f"Explain {c} in simple terms." for c in CONCEPTS]
    out += [f"Discuss the historical significance of {h}." for h in HISTORY]
    out += [f"What is {t}? Give an example." for t in THINGS]
    for i, text in enumerate(texts):
        kind = i % 4
        if kind == 0:
            out.append(f"Summarize the following text in two sentences:\n{text}")
        elif kind == 1:
            out.append(f"Extract every technical term from this text and list them:\n{text}")
        elif kind == 2:
            sentence = re.split(r"(?<=[.!?])\s", text)[0]
            out.append(f"Translate into {LANGUAGES[i % len(LANGUAGES)]}: {sentence}")
        else:
            out.append(f"Read the passage and answer the question.\nPassage: {text}\n"
                       f"Question: What is the main purpose described in the passage?")
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlaps(prompt: str, benchmark_grams: set[tuple[str, ...]], n: int = 8) -> bool:
    words = _words(prompt)
    return any(tuple(words[i:i + n]) in benchmark_grams for i in range(len(words) - n + 1))


def benchmark_grams(texts: Iterable[str], n: int = 8) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        words = _words(text)
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def benchmark_texts() -> list[str]:
    """Every turn of every bundled Spec-Bench question (all 480, not only those a bench run picks)."""
    from importlib import resources

    rows = resources.files("specdec.data.spec_bench").joinpath("question.jsonl").read_text(encoding="utf-8")
    return [t for line in rows.splitlines() if line.strip() for t in json.loads(line)["turns"]]


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts (fewer if the lists run out), shuffled with `seed`, none sharing 8 words with Spec-Bench."""
    rng = random.Random(seed)
    bench = benchmark_grams(benchmark_texts())
    prompts = [p for p in _requests(rng, passages()) if not overlaps(p, bench)]
    rng.shuffle(prompts)
    return prompts[:count]

"""Training prompts for the drafters trained here: built from templates, word lists and the Python stdlib's own
docstrings, never from a benchmark.

Spec-Bench's 13 kinds of request (writing, roleplay, reasoning, math, coding, extraction, stem, humanities,
translation, summarization, qa, math reasoning, retrieval) each get templates filled from fixed lists; the
passages that extraction, summarization, translation and retrieval requests need are docstrings of stdlib
modules (`inspect.getdoc`), so the set is reproducible on one Python version and needs no download.
`training_prompts` drops every prompt that shares an 8-word run with a benchmark prompt (`overlaps`).
The first 381 prompts are the set the shipped drafters were trained on; past them comes a larger set (about
9,000: every template product, three requests a docstring paragraph of ~150 modules, two a public stdlib API,
numeric word problems, two-turn edit requests), for the corpus of #34.
"""

from __future__ import annotations

import importlib
import json
import inspect
import random
import re
from typing import Iterable, Iterator, Sequence

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


def _public(modules: Sequence[str]) -> Iterator[tuple[str, object, list[tuple[str, object]]]]:
    """(name, module, its public functions and classes as (attribute, object), sorted) of each importable module."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [(attr, getattr(module, attr, None)) for attr in sorted(dir(module)) if not attr.startswith("_")]
        yield name, module, [(attr, obj) for attr, obj in objects
                             if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)]


def passages(limit: int = 200, modules: Sequence[str] = MODULES) -> list[str]:
    """Paragraphs (80..700 characters) from the docstrings of stdlib `modules`, in a fixed order."""
    out: list[str] = []
    for _, module, public in _public(modules):
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(obj) or "" for _, obj in public]
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


MORE_MODULES = ("array", "ast", "asyncio", "binascii", "bz2", "cmath", "codecs", "colorsys", "concurrent.futures",
                "configparser", "contextvars", "copyreg", "ctypes", "dis", "doctest", "email.message", "filecmp",
                "fnmatch", "ftplib", "getopt", "gettext", "graphlib", "gzip", "hmac", "html.parser", "http.client",
                "http.server", "imaplib", "ipaddress", "keyword", "linecache", "locale", "lzma", "mailbox",
                "mimetypes", "mmap", "multiprocessing", "netrc", "numbers", "optparse", "pickletools", "platform",
                "plistlib", "poplib", "profile", "pstats", "py_compile", "quopri", "reprlib", "sched", "secrets",
                "select", "selectors", "shelve", "shlex", "signal", "smtplib", "sqlite3", "ssl", "stat",
                "string.templatelib", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "timeit", "token",
                "tokenize", "trace", "traceback", "tracemalloc", "types", "unicodedata", "unittest", "urllib.request",
                "uu", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client",
                "zipapp", "zlib", "zoneinfo", "builtins", "gc", "errno", "os", "io", "collections.abc")
PASSAGE_ASKS = (
    "Summarize the following text in two sentences:\n{text}",
    "Extract every technical term from this text and list them:\n{text}",
    "Rewrite this paragraph in plain language for a beginner:\n{text}",
    "Turn this documentation into a bulleted list of key points:\n{text}",
    "Give this passage a short, descriptive title and explain your choice:\n{text}",
    "Read the passage and answer the question.\nPassage: {text}\nQuestion: What would a programmer use this for?",
    "Here is a paragraph from some documentation. Edit it to be shorter without losing information:\n{text}",
    "Write two quiz questions, with answers, that test understanding of this text:\n{text}",
)
API_ASKS = (
    "Write a short Python example that uses `{api}` and explain what it prints.",
    "What does `{api}` do in Python? Answer in two or three sentences.",
    "Write a small function that relies on `{api}`, with a docstring and one test.",
    "When would you choose `{api}` over writing the logic yourself? Give an example.",
)
STYLES = ("to a ten-year-old", "in one paragraph", "with an everyday analogy", "for a university student",
          "as a numbered list of steps")
CODE_VARIANTS = ("Write a Python function that {t}.", "Write a Python function that {t}, and add type hints and a "
                 "docstring.", "Write a Python function that {t}, then write three unit tests for it.",
                 "Explain how you would write a function that {t}, then write it in Python.",
                 "Here is a task: a function that {t}. Write it in Python and state its time complexity.")
FOLLOW_UPS = ("Now make it shorter.", "Now rewrite it in a more formal tone.", "Now add a title.",
              "Now explain it to a child.", "Now turn it into three bullet points.")


def _apis(limit: int) -> list[str]:
    """`module.name` of public functions and classes with a docstring, in a fixed order."""
    out = [f"{name}.{attr}" for name, _, public in _public(MODULES + MORE_MODULES)
           for attr, obj in public if inspect.getdoc(obj)]
    return list(dict.fromkeys(out))[:limit]


def _more_requests(rng: random.Random, texts: Sequence[str], apis: Sequence[str]) -> list[str]:
    """The larger set (#34's corpus): every template product, three asks a passage, two an API, numeric word
    problems and two-turn edit requests."""
    out = [f"Write a {f} about {t}." for f in FORMS for t in TOPICS]
    out += [f"Pretend you are {r}. {a}" for r in ROLES for a in ASKS]
    out += [f"Explain {c} {s}." for c in CONCEPTS + THINGS for s in STYLES]
    out += [f"Discuss {h}: its causes, its main figures and its consequences." for h in HISTORY]
    out += [f"Compare {a} and {b}: how are they alike and how do they differ?"
            for a, b in zip(CONCEPTS, CONCEPTS[1:] + CONCEPTS[:1])]
    out += [v.format(t=t) for t in CODE_TASKS for v in CODE_VARIANTS]
    out += [f"Write a {f} about {t}.\n{u}" for f in FORMS for t in TOPICS[:12] for u in rng.sample(FOLLOW_UPS, 1)]
    for _ in range(400):
        a, b = rng.sample(NAMES, 2)
        x, y, z = rng.randint(3, 90), rng.randint(2, 30), rng.randint(2, 9)
        out.append(rng.choice((
            f"{a} buys {x} apples and {b} buys {y} more than {a}. They share them equally with {z} friends. "
            f"How many apples does each of the {z + 2} people get? Explain your reasoning.",
            f"A train travels {x * 10} km in {z} hours. How far does it travel in {y} hours at the same speed?",
            f"What is {x} percent of {y * 50}? Show your work.",
            f"{a} saves {y} dollars a week. How many weeks until {a} has {x * y + z} dollars?",
            f"Solve for x: {z}x - {y} = {x}. Explain each step.",
            f"The sum of two numbers is {x + y} and their difference is {abs(x - y)}. What are the numbers?")))
    for i, text in enumerate(texts):
        for j in range(3):
            ask = PASSAGE_ASKS[(3 * i + j) % len(PASSAGE_ASKS)]
            out.append(ask.format(text=text))
        sentence = re.split(r"(?<=[.!?])\s", text)[0]
        out.append(f"Translate into {LANGUAGES[i % len(LANGUAGES)]}: {sentence}")
    for i, api in enumerate(apis):
        for j in range(2):
            out.append(API_ASKS[(2 * i + j) % len(API_ASKS)].format(api=api))
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
    """`count` distinct prompts (fewer if the lists run out), none sharing 8 words with Spec-Bench: the first set
    (381 prompts) shuffled with `seed`, then the larger set (`_more_requests`) shuffled after it, so a count the
    first set covers gives the prompts it always gave."""
    rng = random.Random(seed)
    bench = benchmark_grams(benchmark_texts())
    first = [p for p in _requests(rng, passages()) if not overlaps(p, bench)]
    rng.shuffle(first)
    if count <= len(first):
        return first[:count]
    more = _more_requests(random.Random(seed + 1), passages(limit=3000, modules=MODULES + MORE_MODULES),
                          _apis(limit=3000))
    taken = set(first)
    more = [p for p in dict.fromkeys(more) if p not in taken and not overlaps(p, bench)]
    random.Random(seed + 2).shuffle(more)
    return (first + more)[:count]

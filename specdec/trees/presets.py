"""Named tree presets: YAML files are the data, this module finds and parses them.

A preset file holds ``name``, ``description`` and exactly one of ``rank_paths: [[0], [0, 0], [1], ...]`` or
``parents: [-1, 0, 0, 1, ...]``. ``chain-K`` (root plus K drafts in a row) needs no file.

Where the files live: ``configs/trees/*.yaml``, the one copy, found from a source checkout (editable or not
installed). A wheel must carry them as package data at ``specdec/trees/data/*.yaml`` (pyproject maps that
package directory onto ``configs/trees``); that directory is searched first, the checkout's second.

The ``cpu-*`` presets were made by `specdec.trees.tree.best_tree`: the N rank paths with the highest path
probability under an assumed per-rank acceptance rate (`specdec.trees.tree.CPU_RANK_ACCEPT`). Re-run it with
measured rates to resize or retune a preset.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from specdec.trees.tree import Tree

_CHAIN = re.compile(r"chain-(\d+)")
_SHOWN_CHAINS = tuple(f"chain-{k}" for k in range(1, 9))  # listed by list_trees(); any K works


def preset_dirs() -> list[Path]:
    """Directories searched for preset files, first match wins: installed package data, then the checkout."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "data", here.parents[1] / "configs" / "trees") if d.is_dir()]


def _preset_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for directory in reversed(preset_dirs()):  # earlier directories override later ones
        files.update({p.stem: p for p in sorted(directory.glob("*.yaml"))})
    return files


def list_trees() -> list[str]:
    """Names `load_tree` accepts without a path: the YAML presets and chain-1 .. chain-8 (any chain-K works)."""
    return sorted(_preset_files()) + list(_SHOWN_CHAINS)


def load_tree(name_or_path: str | Path) -> Tree:
    """A preset name, ``chain-K``, or the path of a YAML tree file -> Tree."""
    text = str(name_or_path)
    chain = _CHAIN.fullmatch(text)
    if chain:
        return Tree.chain(int(chain.group(1)))
    presets = _preset_files()
    if text in presets:
        return tree_from_file(presets[text])
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"tree file not found: {path}")
        return tree_from_file(path)
    raise ValueError(f"unknown tree '{text}': choose one of {', '.join(list_trees())}, chain-K, or a YAML file path")


def tree_from_file(path: Path) -> Tree:
    """Parse and validate one tree file; every problem is a ValueError naming the file."""
    from specdec.config import yaml_where

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML{yaml_where(err)}: fix its syntax") from None
    try:
        return tree_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def tree_from_dict(data: object) -> Tree:
    if not isinstance(data, dict):
        raise ValueError("expected a mapping with name, description and rank_paths or parents")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"'{key}' must be a string")
    unknown = set(data) - {"name", "description", "rank_paths", "parents"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    if ("rank_paths" in data) == ("parents" in data):
        raise ValueError("give exactly one of 'rank_paths' or 'parents'")
    if "parents" in data:
        parents = data["parents"]
        if not isinstance(parents, list) or not all(_is_int(p) for p in parents):
            raise ValueError("'parents' must be a list of integers")
        return Tree.from_parents(parents)
    paths = data["rank_paths"]
    valid = isinstance(paths, list) and all(isinstance(p, list) and all(_is_int(r) and r >= 0 for r in p) for p in paths)
    if not valid:
        raise ValueError("'rank_paths' must be a list of lists of non-negative integers")
    if not paths:
        raise ValueError("'rank_paths' is empty: the tree has no nodes to draft; give at least one path, e.g. [[0]]")
    return Tree.from_rank_paths(paths)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

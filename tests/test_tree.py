"""Tree derivation against hand-written tables, tree errors, and the shipped presets."""

from pathlib import Path

import pytest
import torch

from specdec.trees.presets import list_trees, load_tree, preset_dirs
from specdec.trees.tree import CPU_RANK_ACCEPT, best_tree
from specdec.trees.tree import Tree


def table(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_chain_of_three():
    # root -> 1 -> 2 -> 3: every node sees itself and everything before it; one path
    t = Tree.chain(3)
    assert t.parents == (-1, 0, 1, 2)
    assert t.ranks == (0, 0, 0, 0)
    assert t.depth.tolist() == [0, 1, 2, 3]
    assert torch.equal(t.mask, table([[1, 0, 0, 0],
                                      [1, 1, 0, 0],
                                      [1, 1, 1, 0],
                                      [1, 1, 1, 1]]))
    assert t.retrieve.tolist() == [[0, 1, 2, 3]]
    assert t.size == 4 and t.max_depth == 3


# root with children [0] (node 1) and [1] (node 2); node 1 has children [0,0] (node 3) and [0,1] (node 4)
FIVE_PATHS = [[0], [1], [0, 0], [0, 1]]
FIVE_PARENTS = [-1, 0, 0, 1, 1]


def test_five_node_tree_from_rank_paths():
    t = Tree.from_rank_paths(FIVE_PATHS)
    assert t.parents == (-1, 0, 0, 1, 1)
    assert t.ranks == (0, 0, 1, 0, 1)
    assert t.depth.tolist() == [0, 1, 1, 2, 2]
    assert torch.equal(t.mask, table([[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [1, 0, 1, 0, 0],
                                      [1, 1, 0, 1, 0],
                                      [1, 1, 0, 0, 1]]))
    # leaves 2, 3, 4 in node order; the short path is padded with -1
    assert t.retrieve.tolist() == [[0, 2, -1],
                                   [0, 1, 3],
                                   [0, 1, 4]]
    assert t.children(0) == (1, 2) and t.children(1) == (3, 4) and t.children(2) == ()


def test_rank_paths_are_sorted_into_bfs_order():
    # the same tree written depth-first gives the same nodes
    assert Tree.from_rank_paths([[0], [0, 1], [0, 0], [1]]) == Tree.from_rank_paths(FIVE_PATHS)


def test_same_tree_from_parent_array_is_equal():
    a = Tree.from_rank_paths(FIVE_PATHS)
    b = Tree.from_parents(FIVE_PARENTS)  # ranks derived from sibling order
    assert a == b and hash(a) == hash(b)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.depth, b.depth) and torch.equal(a.retrieve, b.retrieve)


def test_deeper_unbalanced_tree():
    # root -> 1 -> 3 -> 5 (rank-0 chain); 2 = rank-1 child of root with child 4; 6 = rank-1 child of node 3
    t = Tree.from_rank_paths([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 1]])
    assert t.parents == (-1, 0, 0, 1, 2, 3, 3)
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(t.mask, table([[1, 0, 0, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0, 0, 0],
                                      [1, 0, 1, 0, 0, 0, 0],
                                      [1, 1, 0, 1, 0, 0, 0],
                                      [1, 0, 1, 0, 1, 0, 0],
                                      [1, 1, 0, 1, 0, 1, 0],
                                      [1, 1, 0, 1, 0, 0, 1]]))
    assert t.retrieve.tolist() == [[0, 2, 4, -1],
                                   [0, 1, 3, 5],
                                   [0, 1, 3, 6]]


def test_plain_step_is_the_root_alone():
    t = Tree.chain(0)
    assert t.size == 1 and t.mask.tolist() == [[True]] and t.retrieve.tolist() == [[0]]


@pytest.mark.parametrize("parents", [[0, 0], [-1, 2, 0], [-1, 0, 3, 1], [-1, -1], []])
def test_bad_parent_arrays(parents):
    with pytest.raises(ValueError, match="tree:"):
        Tree.from_parents(parents)


@pytest.mark.parametrize("paths, problem", [
    ([[0], [0, 1, 0]], "no parent path"),  # (0, 1) is missing
    ([[1, 0]], "no parent path"),
    ([[0], [0]], "duplicate"),
    ([[0], []], "empty"),
])
def test_bad_rank_paths(paths, problem):
    with pytest.raises(ValueError, match=problem):
        Tree.from_rank_paths(paths)


@pytest.mark.parametrize("name", list_trees())
def test_every_preset_loads_and_round_trips(name):
    t = load_tree(name)
    assert t.size >= 2
    assert Tree.from_rank_paths(t.rank_paths()) == t
    assert Tree.from_parents(t.parents, t.ranks) == t


def test_preset_files_are_named_after_themselves():
    import yaml

    for directory in preset_dirs():
        for path in directory.glob("*.yaml"):
            assert yaml.safe_load(path.read_text())["name"] == path.stem


def test_tr80_is_the_papers_template():
    t = load_tree("tr-80")
    assert t.size == 81 and t.max_depth == 6
    assert torch.bincount(t.depth).tolist() == [1, 8, 21, 25, 15, 8, 3]
    assert max(t.ranks) == 7  # k = 8 candidates per token


@pytest.mark.parametrize("n", [4, 8, 12, 16])
def test_cpu_presets_match_their_generator(n):
    t = load_tree(f"cpu-{n}")
    assert t.size == n + 1
    assert t.rank_paths() == best_tree(n, CPU_RANK_ACCEPT)
    if n == 4:  # by hand from the rates 0.6, 0.15, 0.08: path probabilities .6, .36, .216, then .15 for rank 1
        assert t.rank_paths() == [(0,), (1,), (0, 0), (0, 0, 0)]


def test_best_tree_prefers_rank_zero():
    # with these rates the 4 best paths are the rank-0 chain of 3 plus the rank-1 child of the root
    assert best_tree(4, [0.6, 0.15]) == [(0,), (1,), (0, 0), (0, 0, 0)]
    with pytest.raises(ValueError, match="non-increasing"):
        best_tree(4, [0.1, 0.5])


def test_chain_presets_any_length():
    assert load_tree("chain-5") == Tree.chain(5)
    assert load_tree("chain-0") == Tree.chain(0)
    assert "chain-1" in list_trees() and "chain-8" in list_trees()


def test_unknown_name_lists_presets():
    with pytest.raises(ValueError, match=r"unknown tree 'nope'.*cpu-8.*tr-80"):
        load_tree("nope")


def test_tree_file_by_path(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ndescription: two siblings\nparents: [-1, 0, 0]\n")
    assert load_tree(str(f)) == Tree.from_rank_paths([[0], [1]])
    with pytest.raises(ValueError, match="not found"):
        load_tree(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text, problem", [
    ("name: x\ndescription: d\n", "exactly one of"),
    ("name: x\ndescription: d\nparents: [-1, 0]\nrank_paths: [[0]]\n", "exactly one of"),
    ("name: x\ndescription: d\nrank_paths: [[0], [1, 1]]\n", "no parent path"),
    ("name: x\ndescription: d\nparents: [-1, 2, 0]\n", "parents must come before"),
    ("name: x\ndescription: d\nrank_paths: [0, 1]\n", "list of lists"),
    ("name: x\ndescription: d\nrank_paths: [[0, -1]]\n", "non-negative"),
    ("name: x\nrank_paths: [[0]]\n", "'description' must be a string"),
    ("name: x\ndescription: d\nrank_paths: [[0]]\nwidth: 3\n", "unknown keys"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_malformed_files_name_the_file_and_problem(tmp_path: Path, text, problem):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        load_tree(str(f))
    assert str(f) in str(info.value)

"""Label files, vocabulary, hierarchy expansion and label-noise injection."""

import json

import pytest
import torch

from fastssl.data.labels import (
    LabelTable,
    expand_hierarchy,
    inject_label_noise,
    load_vocabulary,
    multi_hot,
    read_labels,
    read_parent_map,
)

VOCAB = ["dog", "cat", "animal", "apple", "fruit", "food"]
V = {"vocabulary": VOCAB}


@pytest.fixture
def vocab_file(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n")
    return p


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_vocabulary(vocab_file, tmp_path):
    assert load_vocabulary(vocab_file) == VOCAB
    with pytest.raises(ValueError, match=r"vocab2.txt:2: blank line"):
        load_vocabulary(write(tmp_path, "vocab2.txt", "dog\n\ncat\n"))
    with pytest.raises(ValueError, match=r"vocab3.txt:3: label 'dog' repeats line 1"):
        load_vocabulary(write(tmp_path, "vocab3.txt", "dog\ncat\ndog\n"))


def test_csv_paths_with_vocabulary(vocab_file, tmp_path):
    p = write(tmp_path, "labels.csv", "path,labels\nb.jpg,cat,animal\na.jpg,dog\n\nc.jpg,apple,fruit,apple\n")
    table = read_labels(p, vocabulary=vocab_file, paths=["a.jpg", "b.jpg", "c.jpg"])
    assert table.labels == [[0], [1, 2], [3, 4]]
    assert table.num_classes == 6 and table.names == VOCAB
    # Without the source's paths the file order is the dataset order.
    table = read_labels(p, vocabulary=VOCAB)
    assert table.labels == [[1, 2], [0], [3, 4]] and table.keys == ["b.jpg", "a.jpg", "c.jpg"]


def test_path_keys_match_source_paths_by_suffix(tmp_path):
    p = write(tmp_path, "labels.csv", "b/x.jpg,1\na/x.jpg,0\n./c.jpg,2\n")
    table = read_labels(p, num_classes=3, paths=["/r/a/x.jpg", "/r/b/x.jpg", "/r/c.jpg"])
    assert table.labels == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"amb.csv:1: path 'x.jpg' matches several of the source's files"):
        read_labels(write(tmp_path, "amb.csv", "x.jpg,1\n"), num_classes=3,
                    paths=["/r/a/x.jpg", "/r/b/x.jpg"])
    unordered = read_labels(p, num_classes=3)
    assert unordered.keys == ["b/x.jpg", "a/x.jpg", "./c.jpg"]
    assert unordered.reorder(["/r/a/x.jpg", "/r/b/x.jpg", "/r/c.jpg"]).labels == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"1 of the source's files have no labels row, e.g. \['/r/d.jpg'\]"):
        unordered.reorder(["/r/a/x.jpg", "/r/b/x.jpg", "/r/c.jpg", "/r/d.jpg"])
    with pytest.raises(ValueError, match="reorder needs a table read from a path-keyed labels file"):
        LabelTable([[0]], 1).reorder(["a.jpg"])


def test_csv_and_jsonl_indices(tmp_path):
    p = write(tmp_path, "labels.csv", "1,4,2\n0,3\n2,0\n")
    table = read_labels(p, num_classes=5)
    assert table.labels == [[3], [2, 4], [0]] and table.num_classes == 5
    rows = [{"index": 1, "labels": ["dog"]}, {"index": 0, "labels": ["fruit", "food"]}]
    q = write(tmp_path, "labels.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_labels(q, vocabulary=VOCAB).labels == [[4, 5], [0]]


@pytest.mark.parametrize(
    "name,text,kwargs,message",
    [
        ("a.csv", "0,dog\n1,cat\n2,horse\n", {"vocabulary": VOCAB},
         r"a.csv:3: unknown label 'horse' \(not in the vocabulary of 6 labels\)"),
        ("b.csv", "0,dog\n1\n", {"vocabulary": VOCAB}, r"b.csv:2: empty row"),
        ("c.csv", "0,dog\n1,cat,,\n5,cat\n", {"vocabulary": VOCAB, "num_items": 3},
         r"c.csv:3: index 5 out of range \[0, 3\)"),
        ("d.csv", "0,1\n1,7\n", {"num_classes": 5}, r"d.csv:2: label id 7 out of range \[0, 5\)"),
        ("e.csv", "0,1\n0,2\n", {"num_items": 2}, r"e.csv:2: item 0 already labelled on line 1"),
        ("f.csv", "0,1\n", {"num_items": 3}, r"f.csv: 2 item\(s\) have no row, e.g. \[1, 2\]"),
        ("g.csv", "0,1\nx.jpg,2\n", {}, r"g.csv:2: expected an integer index, got 'x.jpg'"),
        ("h.csv", "0,dog\n", {}, r"h.csv:1: label 'dog' is not an integer id and no vocabulary"),
        ("i.csv", "a.jpg,dog\nz.jpg,cat\n", {"vocabulary": VOCAB, "paths": ["a.jpg"]},
         r"i.csv:2: path 'z.jpg' is not in the source's 1 files"),
        ("j.jsonl", '{"index": 0, "labels": ["dog"]}\n{"index": 1, "labels": []}\n', V,
         r"j.jsonl:2: empty row"),
        ("k.jsonl", '{"index": 0, "labels": ["dog"]}\n{"index": 1, "labels": ["cow"]}\n', V,
         r"k.jsonl:2: unknown label 'cow'"),
        ("l.jsonl", '{"index": 0, "labels": ["dog"]}\n{"index": 9, "labels": ["cat"]}\n', V,
         r"l.jsonl:2: index 9 out of range \[0, 2\)"),
        ("m.jsonl", '{"index": 0, "labels": ["dog"]}\nnot json\n', V,
         r"m.jsonl:2: not a JSON object"),
        ("n.jsonl", '{"labels": ["dog"]}\n', V, r'n.jsonl:1: expected an object with "labels"'),
        ("o.txt", "0,1\n", {}, r"labels file must end in .csv, .jsonl or .json, got 'o.txt'"),
    ],
)
def test_label_file_errors_name_the_line(tmp_path, name, text, kwargs, message):
    with pytest.raises(ValueError, match=message):
        read_labels(write(tmp_path, name, text), **kwargs)


def test_hierarchy_expansion(tmp_path):
    # dog -> animal; apple -> fruit -> food; cat -> animal
    parents = {0: 2, 1: [2], 3: 4, 4: 5}
    assert expand_hierarchy([[0], [3], [1, 3], [5]], parents) == [[0, 2], [3, 4, 5], [1, 2, 3, 4, 5], [5]]
    # A DAG: label 0 has two parents that share an ancestor.
    assert expand_hierarchy([[0]], {0: [1, 2], 1: 3, 2: 3}) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="the parent map has a cycle: 1 -> 2 -> 1"):
        expand_hierarchy([[0]], {0: 1, 1: 2, 2: 1})
    p = write(tmp_path, "parents.csv", "dog,animal\ncat,animal\napple,fruit\nfruit,food\n")
    assert read_parent_map(p, VOCAB) == {0: [2], 1: [2], 3: [4], 4: [5]}
    with pytest.raises(ValueError, match=r"bad.csv:2: unknown label 'pear'"):
        read_parent_map(write(tmp_path, "bad.csv", "dog,animal\npear,fruit\n"), VOCAB)
    table = LabelTable([[0], [3]], 6, VOCAB).expand_hierarchy(read_parent_map(p, VOCAB))
    assert table.labels == [[0, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match=r"parent map uses label id 9, outside \[0, 6\)"):
        LabelTable([[0]], 6).expand_hierarchy({0: 9})


def test_multi_hot_and_padded():
    table = LabelTable([[1, 3], [0], [2, 3, 4]], 5)
    rows = table.padded()
    assert rows.tolist() == [[1, 3, -1], [0, -1, -1], [2, 3, 4]]
    want = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(multi_hot(rows[torch.tensor([2, 0, 1])], 5), want)
    assert table.counts().tolist() == [1, 1, 1, 2, 1]
    with pytest.raises(ValueError, match="item 1 has no labels"):
        LabelTable([[0], []], 2)
    with pytest.raises(ValueError, match=r"item 0 has label ids \[0, 2\] outside \[0, 2\)"):
        LabelTable([[0, 2]], 2)


def test_label_noise_fraction_and_properties():
    # Long-tailed single and double labels; 10 classes.
    rows = [[i % 10] for i in range(2000)] + [[0, 1]] * 1000 + [[0]] * 2000
    total = sum(len(r) for r in rows)
    for fraction in (0.0, 0.2, 0.5, 1.0):
        noisy = inject_label_noise(rows, fraction, 10, seed=4)
        changed = sum(a != b for ra, rb in zip(rows, noisy) for a, b in zip(ra, rb))
        assert changed == round(fraction * total)
        assert all(len(set(r)) == len(r) for r in noisy)  # no duplicate labels in an image
        assert all(0 <= c < 10 for r in noisy for c in r)
    assert inject_label_noise(rows, 0.2, 10, seed=4) == inject_label_noise(rows, 0.2, 10, seed=4)
    assert inject_label_noise(rows, 0.2, 10, seed=4) != inject_label_noise(rows, 0.2, 10, seed=5)


def test_label_noise_draws_from_the_marginal():
    # Single-label items: a replaced label o becomes c != o with probability w_c / (W - w_o).
    sizes = [4000, 2000, 1000, 500, 250, 250]
    rows = [[c] for c, n in enumerate(sizes) for _ in range(n)]
    noisy = inject_label_noise(rows, 0.5, 6, seed=0)
    total = sum(sizes)
    got = [0] * 6
    expected = [0.0] * 6
    for (o,), (c,) in zip(rows, noisy):
        if c != o:
            got[c] += 1
            for k in range(6):
                if k != o:
                    expected[k] += sizes[k] / (total - sizes[o])
    m = sum(got)
    assert m == round(0.5 * total)
    for k in range(6):
        p = expected[k] / m
        assert abs(got[k] / m - p) < 5 * (p * (1 - p) / m) ** 0.5 + 1e-3, (k, got[k] / m, p)
    uniform = inject_label_noise(rows, 0.5, 6, seed=0, distribution="uniform")
    replaced = [c for (o,), (c,) in zip(rows, uniform) if c != o]
    share5 = replaced.count(5) / len(replaced)  # class 5 is rare, so uniform gives it more than marginal
    assert share5 > 1.5 * got[5] / m


def test_label_noise_errors():
    with pytest.raises(ValueError, match="fraction must be in"):
        inject_label_noise([[0]], 1.5, 3, seed=0)
    with pytest.raises(ValueError, match="distribution must be"):
        inject_label_noise([[0]], 0.5, 3, seed=0, distribution="zipf")
    with pytest.raises(ValueError, match=r"labels must be ids in \[0, 3\)"):
        inject_label_noise([[5]], 0.5, 3, seed=0)
    with pytest.raises(ValueError, match="cannot replace a label of item 0"):
        inject_label_noise([[0, 1]], 1.0, 2, seed=0)

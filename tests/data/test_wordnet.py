"""WordNet vocabularies: hashtags merged into synsets, label spaces matched to target synsets,
hierarchies derived from WordNet. Expected synsets, ids and hypernyms are WordNet 3.0's own
(e.g. car.n.01 = n02958343, ImageNet's id; apple.n.01's hypernyms edible_fruit.n.01 and
pome.n.01, both under fruit.n.01), written here by hand."""

import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastssl.cli import main
from fastssl.data.labels import LabelTable, load_vocabulary, read_parent_map
from fastssl.data.shards import ShardSource
from fastssl.data.vocab import load_tag_ids, wordnet_vocabulary
from fastssl.data.wordnet import (
    DEBIAN_WORDNET,
    WordNetMissingError,
    load_wordnet,
    normalise_tag,
    noun_synset,
    prepare_wordnet,
    read_targets,
    wordnet_parent_map,
)

# One image per row; a fixed list of hashtags as captions carry them (lower-cased, no '#').
ROWS = [["automobile", "car"], ["cars"], ["sneakers"], ["sneaker", "machine"], ["dog", "puppies"],
        ["beagle"], ["golden_retriever"], ["tabby"], ["kitten"], ["apple"], ["pear", "apple"],
        ["selfie"], ["instagood", "selfie"], []]
FRUIT = ["apple.n.01", "pear.n.01", "edible_fruit.n.01", "pome.n.01", "fruit.n.01"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    if not (DEBIAN_WORDNET / "index.noun").is_file():
        pytest.skip("Debian's wordnet-base is not installed (`make test` installs it)")
    return tmp_path_factory.mktemp("fastssl-cache")


@pytest.fixture(scope="module")
def wn(cache):
    return load_wordnet(DEBIAN_WORDNET, cache)


@pytest.fixture
def env(cache, monkeypatch):
    """The CLI and the method read the same prepared copy as the `wn` fixture."""
    monkeypatch.setenv("FASTSSL_CACHE", str(cache))
    monkeypatch.setenv("FASTSSL_WORDNET", str(DEBIAN_WORDNET))


def by_tag(vocab):
    return {e["tag"]: e for e in vocab.entries}


def label_of(vocab):
    return {h: e["tag"] for e in vocab.entries for h in e["hashtags"]}


def test_prepared_copy_reads_wordnet_30(wn, cache):
    assert (cache / "nltk_data" / "corpora" / "wordnet" / "lexnames").read_text().count("\n") == 45
    assert wn.get_version() == "3.0"
    assert prepare_wordnet(DEBIAN_WORDNET, cache) == cache / "nltk_data"  # built once, reused
    assert normalise_tag("#Golden Retriever") == "golden_retriever"
    assert noun_synset(wn, "#Sneakers").name() == "gym_shoe.n.01"
    assert noun_synset(wn, "mice").name() == "mouse.n.01"
    assert noun_synset(wn, "instagood") is None


def test_prepared_copy_is_rebuilt_when_the_database_changes(cache, tmp_path):
    source = tmp_path / "dict"
    source.mkdir()
    for f in DEBIAN_WORDNET.iterdir():
        if f.is_file():
            (source / f.name).write_bytes(f.read_bytes())
    copy = prepare_wordnet(source, tmp_path / "c") / "corpora" / "wordnet"
    first = (copy / "data.noun").stat().st_ino
    prepare_wordnet(source, tmp_path / "c")
    assert (copy / "data.noun").stat().st_ino == first  # unchanged database: the copy is reused
    (source / "adv.exc").write_text((source / "adv.exc").read_text() + "\n")
    prepare_wordnet(source, tmp_path / "c")
    assert (copy / "data.noun").stat().st_ino != first and (copy / "adv.exc").read_bytes().endswith(b"\n\n")
    assert [p.name for p in copy.parent.iterdir()] == ["wordnet"]  # no half-built copy left beside it


def test_synonyms_merge_and_senses_stay_apart(wn):
    vocab = wordnet_vocabulary(ROWS, wordnet=wn)
    labels, entries = label_of(vocab), by_tag(vocab)
    assert labels["automobile"] == labels["car"] == labels["cars"] == "car.n.01"
    assert labels["sneakers"] == labels["sneaker"] == "gym_shoe.n.01"
    car, shoe = entries["car.n.01"], entries["gym_shoe.n.01"]
    assert car["wnid"] == "n02958343" and car["hashtags"] == ["automobile", "car", "cars"]
    assert car["lemmas"] == ["car", "auto", "automobile", "machine", "motorcar"] and car["count"] == 2
    assert shoe["wnid"] == "n03472535" and shoe["lemmas"] == ["gym_shoe", "sneaker", "tennis_shoe"]
    # "machine" is a lemma of car.n.01, but its most frequent sense is machine.n.01;
    # "puppies" is a puppy, not the dog its image is also tagged with.
    assert labels["machine"] == "machine.n.01" and labels["puppies"] == "puppy.n.01"
    assert labels["dog"] == "dog.n.01" and labels["kitten"] == "kitten.n.01"
    assert "selfie" not in labels and "instagood" not in labels
    assert vocab.info["unmatched_hashtags"] == 2 and vocab.info["images_covered"] == 11
    assert vocab.tags[:3] == ["apple.n.01", "car.n.01", "gym_shoe.n.01"]  # 2 images each, then by name
    kept = wordnet_vocabulary(ROWS, wordnet=wn, unmatched="keep", top=20)
    assert by_tag(kept)["selfie"] == {"tag": "selfie", "synset": None, "wnid": None, "lemmas": [],
                                      "hashtags": ["selfie"], "count": 2}
    assert wordnet_vocabulary(ROWS, wordnet=wn, top=3).tags == vocab.tags[:3]


def test_match_keeps_exactly_the_hashtags_under_the_targets(wn, tmp_path):
    # ImageNet's LOC_synset_mapping.txt form, a synset name, a comment; goldfish has no hashtag.
    labels = tmp_path / "targets.txt"
    labels.write_text("n02084071 dog, domestic dog, Canis familiaris\n# cats\ncat.n.01\n\nn01443537\n")
    assert [s.name() for s in read_targets(wn, labels)] == ["dog.n.01", "cat.n.01", "goldfish.n.01"]
    vocab = wordnet_vocabulary(ROWS, wordnet=wn, match=labels)
    # beagle < hound < hunting_dog < dog; golden_retriever < retriever < sporting_dog < hunting_dog;
    # puppy < dog; tabby < domestic_cat < cat. kitten < young_mammal: not under cat.n.01.
    assert set(label_of(vocab)) == {"dog", "puppies", "beagle", "golden_retriever", "tabby"}
    assert {e["tag"]: e["target"] for e in vocab.entries} == {
        "dog.n.01": "n02084071", "puppy.n.01": "n02084071", "beagle.n.01": "n02084071",
        "golden_retriever.n.01": "n02084071", "tabby.n.01": "n02121620"}
    info = vocab.info
    assert (info["targets"], info["targets_covered"], info["images_covered"], info["images"]) == (3, 2, 4, 14)
    mapped = wordnet_vocabulary(ROWS, wordnet=wn, match="dog,cat", map_to_target=True)
    assert {e["tag"]: e["hashtags"] for e in mapped.entries} == {
        "dog.n.01": ["beagle", "dog", "golden_retriever", "puppies"], "cat.n.01": ["tabby"]}
    assert [e["count"] for e in mapped.entries] == [3, 1]


@pytest.mark.parametrize("kw, message", [
    (dict(match="n99999999"), r"match item 1: 'n99999999' is not a WordNet noun synset"),
    (dict(match="dog,n02084071"), r"match item 2: 'n02084071' is dog.n.01, already given at match item 1"),
    (dict(match="instagood"), r"'instagood' is not a WordNet noun synset"),
    (dict(match="missing/targets.txt"), r"match: no such file"),
    (dict(map_to_target=True), r"map_to_target \(--map-to-target\) needs the target labels"),
    (dict(depth=2), r"depth / root bound the hierarchy"),
    (dict(match="dog", unmatched="keep"), r"contradicts match"),
    (dict(unmatched="some"), r"unmatched must be one of drop, keep"),
    (dict(hierarchy="wordnet", depth=0), r"depth must be an integer >= 1"),
])
def test_bad_arguments_are_named(wn, kw, message):
    with pytest.raises(ValueError, match=message):
        wordnet_vocabulary(ROWS, wordnet=wn, **kw)


def test_wordnet_hierarchy_reproduces_a_hand_written_parent_map(wn, tmp_path):
    hand = {0: [2, 3], 1: [2, 3], 2: [4], 3: [4]}  # apple, pear -> edible_fruit, pome -> fruit
    assert wordnet_parent_map(FRUIT, wordnet=wn) == hand
    (tmp_path / "parents.csv").write_text("apple.n.01,edible_fruit.n.01,pome.n.01\n"
                                          "pear.n.01,edible_fruit.n.01,pome.n.01\n"
                                          "edible_fruit.n.01,fruit.n.01\npome.n.01,fruit.n.01\n")
    assert read_parent_map(tmp_path / "parents.csv", FRUIT) == hand
    table = LabelTable([[0], [1], [4]], 5, FRUIT)
    expanded = table.expand_hierarchy(read_parent_map("wordnet", FRUIT))
    assert expanded.labels == [[0, 2, 3, 4], [1, 2, 3, 4], [4]]
    # A label space without the intermediate synsets: the nearest hypernym that is a label.
    assert wordnet_parent_map(["apple.n.01", "fruit.n.01", "selfie"], wordnet=wn) == {0: [1]}
    with pytest.raises(ValueError, match=r"no label of the vocabulary is a WordNet synset name"):
        read_parent_map("wordnet", ["dog", "cat"])
    with pytest.raises(ValueError, match=r"needs the vocabulary of synset names"):
        read_parent_map("wordnet", None)


def test_vocab_hierarchy_adds_hypernyms_up_to_a_root_or_depth(wn):
    rows = [["apple"], ["pear"], ["apple", "pear"], ["dog"]]
    vocab = wordnet_vocabulary(rows, wordnet=wn, hierarchy="wordnet", root="fruit.n.01")
    assert {e["tag"]: e["count"] for e in vocab.entries} == {
        "apple.n.01": 2, "pear.n.01": 2, "edible_fruit.n.01": 3, "pome.n.01": 3, "fruit.n.01": 3,
        "dog.n.01": 1}
    assert by_tag(vocab)["fruit.n.01"]["hashtags"] == [] and vocab.info["hypernyms_added"] == 3
    shallow = wordnet_vocabulary(rows[:3], wordnet=wn, hierarchy="wordnet", depth=1)
    assert set(shallow.tags) == {"apple.n.01", "pear.n.01", "edible_fruit.n.01", "pome.n.01"}
    full = wordnet_vocabulary(rows, wordnet=wn, hierarchy="wordnet")
    assert by_tag(full)["entity.n.01"]["count"] == 4 and by_tag(full)["canine.n.02"]["count"] == 1


def _shards(folder, captions):
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 20 * k, dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{k:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


CAPTIONS = ["#Automobile on the road #car", "my #cars", "new #sneakers", "#sneaker and a #machine",
            "#dog with #puppies", "#beagle", "#golden_retriever", "#tabby", "#kitten", "#apple",
            "#pear #apple", "#selfie", "no tags at all"]


def test_cli_vocab_wordnet_match_and_hierarchy(env, tmp_path, capsys):
    folder = _shards(tmp_path / "laion", CAPTIONS)
    out = tmp_path / "v.json"
    assert main(["vocab", str(folder), "--wordnet", "--out", str(out)]) == 0
    printed, log = capsys.readouterr()
    assert "2\tcar.n.01\tn02958343\t#automobile #car #cars" in printed.splitlines()
    assert "most frequent noun sense (WordNet's first synset)" in log
    assert "1 hashtags not in WordNet dropped" in log
    data = json.loads(out.read_text())
    assert data["tags"] == load_vocabulary(out) and data["counts"][:3] == [2, 2, 2]
    ids = load_tag_ids(out)
    assert ids["automobile"] == ids["car"] == ids["car.n.01"] == data["tags"].index("car.n.01")
    assert main(["vocab", str(folder), "--match", "n02084071,n02121620", "--map-to-target",
                 "--out", str(out)]) == 0
    assert "covers 2 of 2 target classes; 4 of 13 images (30.8%) carry a label" in capsys.readouterr().err
    assert json.loads(out.read_text())["tags"] == ["dog.n.01", "cat.n.01"]
    assert main(["vocab", str(folder), "--wordnet", "--out", str(tmp_path / "v.txt")]) == 2
    assert "give a .json path" in capsys.readouterr().err
    assert main(["vocab", str(folder), "--depth", "2"]) == 2
    assert "depth / root bound the hierarchy" in capsys.readouterr().err


def test_weak_trains_on_a_wordnet_vocabulary_with_its_hierarchy(env, tmp_path):
    from fastssl.engine import resolve_config
    from fastssl.methods.weak import WeakConfig, WeakSupervised

    folder = _shards(tmp_path / "fruit", ["#apple", "#pears", "#Apple #pear", "#selfie"])
    vocab = tmp_path / "fruit.json"
    assert main(["vocab", str(folder), "--hierarchy", "wordnet", "--root", "fruit.n.01",
                 "--out", str(vocab)]) == 0
    names = load_vocabulary(vocab)
    assert sorted(names) == sorted(FRUIT)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cfg = resolve_config(WeakConfig, overrides=dict(backbone="resnet18", image_size=8, batch_size=4, epochs=1,
                                                    sampling="natural", vocabulary=str(vocab),
                                                    hierarchy="wordnet"))
    method = WeakSupervised(cfg, backbone=(net, 4))
    source = ShardSource(folder)
    method.bind_data(source)
    fruit = {names.index(n) for n in ("edible_fruit.n.01", "pome.n.01", "fruit.n.01")}
    apple, pear = names.index("apple.n.01"), names.index("pear.n.01")
    want = [{apple} | fruit, {pear} | fruit, {apple, pear} | fruit]
    assert [set(row) for row in method.labels.labels] == want
    target = method.targets({"index": torch.tensor([0, 2])})
    assert (target / target.sum(1, keepdim=True))[1, apple].item() == pytest.approx(1 / 5)
    # The sampler draws over the expanded table; the #selfie image carries no label and is never drawn.
    assert [name.rsplit(":", 1)[-1] for name, _ in method.build_sampler(source).excluded] == ["00003"]


def test_old_vocabulary_files_still_load(tmp_path):
    (tmp_path / "v.txt").write_text("dog\ncat\n")
    (tmp_path / "v.json").write_text(json.dumps({"tags": ["dog", "cat"], "counts": [3, 2]}))
    assert load_tag_ids(tmp_path / "v.txt") == load_tag_ids(tmp_path / "v.json") == {"dog": 0, "cat": 1}


def test_missing_wordnet_is_one_line_naming_the_packages(tmp_path, monkeypatch, capsys):
    with pytest.raises(WordNetMissingError, match=r"install Debian's wordnet-base wordnet-sense-index"):
        prepare_wordnet(tmp_path / "nowhere", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    folder = _shards(tmp_path / "laion", CAPTIONS[:2])
    monkeypatch.setenv("FASTSSL_WORDNET", str(tmp_path / "nowhere"))
    assert main(["vocab", str(folder), "--wordnet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastssl vocab: error: WordNet 3.0 not found" in err
    assert "apt-get install wordnet-base wordnet-sense-index" in err


def test_missing_nltk_says_what_to_install(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk fails as if it were not installed
    with pytest.raises(WordNetMissingError, match=r"needs nltk, which is not installed: pip install "
                                                  r"'fastssl\[wordnet\]'"):
        load_wordnet(DEBIAN_WORDNET, tmp_path / "other-cache")

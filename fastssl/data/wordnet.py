"""WordNet 3.0 for label spaces: hashtags to noun synsets, target label sets, hypernyms.

The database is Debian's (packages ``wordnet-base`` and ``wordnet-sense-index``, installed
under /usr/share/wordnet; ``make wordnet`` installs them where apt exists), or any WordNet 3.0
``dict`` folder named by the environment variable FASTSSL_WORDNET. It is read by nltk's
WordNet corpus reader (``pip install 'fastssl[wordnet]'``), which accepts only files under
its data path, so a copy is prepared once in ``<cache>/nltk_data/corpora/wordnet`` (cache:
FASTSSL_CACHE, else $XDG_CACHE_HOME/fastssl, else ~/.cache/fastssl) together with the
``lexnames`` file the reader needs and Debian does not ship. Nothing is downloaded, and
``NLTK_DATA=<cache>/nltk_data`` makes the same copy ``nltk.corpus.wordnet``.

Senses: a word names several synsets; WordNet lists them by decreasing tagged frequency
(sense counts in the semantic concordance), so a hashtag goes to the FIRST noun synset of
its lemma, its most frequent sense. ImageNet's class ids are WordNet ids: ``n`` followed by
the synset's 8-digit offset in data.noun (car.n.01 is n02958343).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

DEBIAN_WORDNET = Path("/usr/share/wordnet")
PACKAGES = "wordnet-base wordnet-sense-index"
# The files nltk's reader opens when it starts (data files are opened on first use).
REQUIRED = tuple(f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data")) + (
    "noun.exc", "verb.exc", "adj.exc", "adv.exc")
# lexnames(5WN) of WordNet 3.0: the 45 lexicographer files, numbered by position.
LEXNAMES = ("adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
            "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
            "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
            "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
            "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
            "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
            "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_WNID = re.compile(r"n\d{8}")
_SYNSET_NAME = re.compile(r".+\.[nvasr]\.\d+")
_STAMP = ".fastssl-source.json"


class WordNetMissingError(OSError):
    """WordNet's database or nltk is not installed; the message says what to install."""


def cache_dir() -> Path:
    """fastssl's cache folder: FASTSSL_CACHE, else $XDG_CACHE_HOME/fastssl, else ~/.cache/fastssl."""
    if os.environ.get("FASTSSL_CACHE"):
        return Path(os.environ["FASTSSL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastssl"


def wordnet_home() -> Path:
    """The WordNet database folder: FASTSSL_WORDNET, else Debian's /usr/share/wordnet."""
    return Path(os.environ.get("FASTSSL_WORDNET") or DEBIAN_WORDNET)


def prepare_wordnet(source: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """The nltk data folder ``<cache>/nltk_data`` whose corpora/wordnet is a copy of the
    database at `source` (default wordnet_home()) plus ``lexnames``; built on first use and
    rebuilt when the source's files change (their sizes and times are kept beside the copy)."""
    source = Path(source) if source is not None else wordnet_home()
    missing = [name for name in REQUIRED if not (source / name).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet 3.0 not found: {source} lacks {', '.join(missing[:3])}; install Debian's {PACKAGES} "
            f"(apt-get install {PACKAGES}; `make wordnet` does it where apt exists) or set FASTSSL_WORDNET "
            f"to a WordNet 3.0 dict folder")
    files = sorted(p for p in source.iterdir() if p.is_file())
    stamp = {"source": str(source.resolve()),
             "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}
    root = Path(cache if cache is not None else cache_dir()) / "nltk_data"
    target = root / "corpora" / "wordnet"
    if _read_stamp(target) == stamp:
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so processes starting together never read half a copy.
    build = Path(tempfile.mkdtemp(prefix="wordnet.", dir=target.parent))
    for p in files:
        shutil.copyfile(p, build / p.name)
    (build / "lexnames").write_text(
        "".join(f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)))
    (build / _STAMP).write_text(json.dumps(stamp))
    if target.exists() and _read_stamp(target) != stamp:
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:  # another process put an equal copy there first
        shutil.rmtree(build, ignore_errors=True)
        if _read_stamp(target) != stamp:
            raise
    return root


def _read_stamp(target: Path) -> dict | None:
    try:
        return json.loads((target / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def load_wordnet(source: str | Path | None = None, cache: str | Path | None = None):
    """nltk's WordNetCorpusReader over the prepared copy (see prepare_wordnet); one per
    (source, cache) per process, as reading the index takes seconds."""
    source = Path(source) if source is not None else wordnet_home()
    cache = Path(cache) if cache is not None else cache_dir()
    return _reader(str(source), str(cache))


@functools.cache
def _reader(source: str, cache: str):
    root = prepare_wordnet(source, cache)
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise WordNetMissingError(f"WordNet needs nltk, which is not installed: pip install "
                                  f"'fastssl[wordnet]' ({e.name})") from e
    # nltk opens corpus files only under the folders of nltk.data.path.
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():  # no Open Multilingual WordNet here: English synsets only
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return WordNetCorpusReader(nltk.data.FileSystemPathPointer(str(root / "corpora" / "wordnet")), None)


def normalise_tag(tag: str) -> str:
    """A hashtag as a WordNet lemma would spell it: no leading '#', lower case, '_' for spaces."""
    return "_".join(tag.strip().lstrip("#").lower().split())


def noun_synset(wordnet, tag: str):
    """The noun synset a hashtag names, or None: the tag normalised, reduced to its lemma by
    WordNet's morphology (morphy: 'sneakers' -> 'sneaker', 'mice' -> 'mouse'), then the first
    synset of that lemma, its most frequent sense."""
    word = normalise_tag(tag)
    lemma = wordnet.morphy(word, wordnet.NOUN) if word else None
    senses = wordnet.synsets(lemma, wordnet.NOUN) if lemma else []
    return senses[0] if senses else None


def wnid(synset) -> str:
    """The synset's WordNet id as ImageNet writes it: part of speech + 8-digit offset (n02958343)."""
    return f"{synset.pos()}{synset.offset():08d}"


def parse_synset(wordnet, text: str, where: str):
    """The noun synset named by a WordNet id (n02958343), a synset name (car.n.01) or a word
    (its most frequent noun sense); a ValueError naming `where` otherwise."""
    from nltk.corpus.reader.wordnet import WordNetError

    text = text.strip()
    try:
        if _WNID.fullmatch(text):
            with warnings.catch_warnings():  # nltk also warns of an unknown offset; the error below says it
                warnings.simplefilter("ignore")
                synset = wordnet.synset_from_pos_and_offset("n", int(text[1:]))
        elif _SYNSET_NAME.fullmatch(text):
            synset = wordnet.synset(text)
        else:
            synset = noun_synset(wordnet, text)
    except (WordNetError, ValueError):
        synset = None
    if synset is None or synset.pos() != "n":
        raise ValueError(f"{where}: {text!r} is not a WordNet noun synset (expected a WordNet id like "
                         f"n02958343, a synset name like car.n.01, or a noun)")
    return synset


def read_targets(wordnet, spec: str | Path) -> list:
    """A target label set as noun synsets, in order: a file with one label per line (blank
    lines and '#' comments skipped; a line starting with a WordNet id counts as that id, as
    in ImageNet's LOC_synset_mapping.txt "n01440764 tench, Tinca tinca"), or a comma list."""
    spec = str(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            lines = [(f"{spec}:{n}", line.strip()) for n, line in enumerate(f, 1)]
        items = [(where, line.split()[0] if _WNID.fullmatch(line.split()[0]) else line)
                 for where, line in lines if line and not line.startswith("#")]
    elif os.sep in spec or spec.endswith(".txt"):
        raise ValueError(f"match: no such file {spec!r} (expected a file of WordNet ids, synset names or "
                         f"words, or a comma list)")
    else:
        items = [(f"match item {n}", item.strip())
                 for n, item in enumerate(spec.split(","), 1) if item.strip()]
    if not items:
        raise ValueError(f"match: {spec!r} names no target label")
    targets, seen = [], {}
    for where, text in items:
        synset = parse_synset(wordnet, text, where)
        if synset in seen:
            raise ValueError(f"{where}: {text!r} is {synset.name()}, already given at {seen[synset]}")
        seen[synset] = where
        targets.append(synset)
    return targets


def target_distances(synset, targets: Mapping) -> dict[int, int]:
    """{target index: hypernym steps up from `synset` to it} over the targets that are
    `synset` itself (0 steps) or one of its hypernyms / instance hypernyms; `targets` maps
    each target synset to its index."""
    out: dict[int, int] = {}
    for ancestor, steps in synset.hypernym_distances():
        if ancestor in targets:
            k = targets[ancestor]
            out[k] = min(steps, out.get(k, steps))
    return out


def hypernyms(synset, *, depth: int | None = None, root=None) -> set:
    """The synset's hypernyms and instance hypernyms, transitively: at most `depth` steps
    up (None: all), and only `root` and those under it when a root is given."""
    found = {s for s, steps in synset.hypernym_distances() if 0 < steps and (depth is None or steps <= depth)}
    if root is not None:
        found = {s for s in found if any(a == root for a, _ in s.hypernym_distances())}
    return found


def wordnet_parent_map(names: Sequence[str] | None, *, wordnet=None) -> dict[int, list[int]]:
    """Child id -> parent ids over a label space whose labels are synset names (as `fastssl
    vocab --wordnet` writes them): a label's parents are its nearest hypernyms (or instance
    hypernyms) that are labels too, which are WordNet's own edges when the label space holds
    every ancestor (`fastssl vocab --hierarchy wordnet`). Labels that are not synset names
    (kept unmatched hashtags) have no parents. Feed it to LabelTable.expand_hierarchy."""
    if not names:
        raise ValueError("hierarchy 'wordnet' needs the vocabulary of synset names it applies to "
                         "(a WordNet vocabulary from `fastssl vocab --wordnet`)")
    wordnet = wordnet if wordnet is not None else load_wordnet()
    ids = {}
    for i, name in enumerate(names):
        if _SYNSET_NAME.fullmatch(name):
            ids[parse_synset(wordnet, name, f"vocabulary label {i}")] = i
    if not ids:
        raise ValueError(f"hierarchy 'wordnet': no label of the vocabulary is a WordNet synset name "
                         f"(e.g. car.n.01), got {list(names[:3])}...; build one with "
                         f"`fastssl vocab --wordnet`")
    parents: dict[int, list[int]] = {}
    for synset, i in ids.items():
        found, frontier, seen = [], synset.hypernyms() + synset.instance_hypernyms(), set()
        while frontier:
            up = []
            for s in frontier:
                if s in seen:
                    continue
                seen.add(s)
                if s in ids:
                    found.append(ids[s])
                else:
                    up += s.hypernyms() + s.instance_hypernyms()
            frontier = up
        if found:
            parents[i] = sorted(set(found))
    return parents


__all__ = ["DEBIAN_WORDNET", "PACKAGES", "WordNetMissingError", "cache_dir", "hypernyms", "load_wordnet",
           "noun_synset", "normalise_tag", "parse_synset", "prepare_wordnet", "read_targets",
           "target_distances", "wnid", "wordnet_home", "wordnet_parent_map"]

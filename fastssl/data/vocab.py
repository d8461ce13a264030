"""Hashtag vocabularies canonicalised through WordNet (Mahajan et al. 2018, Sec. 2.1: hashtags
merged into WordNet synsets; label spaces matched to a target task's synsets).

`wordnet_vocabulary` turns each image's hashtags into noun synsets (fastssl.data.wordnet:
normalised, reduced to their lemma, each to its most frequent sense), optionally keeps only
those that are, or are hyponyms of, a target label set's synsets (`match`; ImageNet-1k's
WordNet ids are the documented example), optionally maps them to their target class, and
optionally adds their hypernyms to the label space (`hierarchy="wordnet"`, JFT-style:
an apple is also a fruit). Counts are images, after the hierarchy's expansion.

File (JSON, what `fastssl vocab --wordnet --out V.json` writes): the plain vocabulary keys
``{"tags": [...], "counts": [...]}`` (so load_vocabulary reads it as any vocabulary) plus
``"entries"``, one per tag in the same order: ``{"synset": "car.n.01", "wnid": "n02958343",
"lemmas": [...], "hashtags": ["automobile", "car", "cars"], "count": 12}`` (and ``"target"``
with `match`), and ``"wordnet"``: how it was built and its coverage. A hypernym added by the
hierarchy lists no hashtags unless one names it; a kept unmatched hashtag has synset and
wnid null. load_tag_ids
maps the raw hashtags of the shards to the ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastssl.data import wordnet as wn_
from fastssl.data.labels import expand_hierarchy, load_vocabulary
from fastssl.validation import check_bool, check_choice, check_int

SENSE_RULE = "each hashtag to its most frequent noun sense (WordNet's first synset)"
UNMATCHED = ("drop", "keep")


@dataclass
class WordNetVocabulary:
    """Entries (dicts as in the module docstring, with their "tag"), most frequent first, and
    `info`: how the vocabulary was built and what it covers."""

    entries: list[dict]
    info: dict = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        return [e["tag"] for e in self.entries]

    def to_json(self) -> dict:
        return {"tags": self.tags, "counts": [e["count"] for e in self.entries],
                "entries": [{k: v for k, v in e.items() if k != "tag"} for e in self.entries],
                "wordnet": self.info}

    def table(self, rows: int = 20) -> str:
        """The first `rows` entries: count, label, WordNet id, hashtags."""
        return "\n".join(f"{e['count']}\t{e['tag']}\t{e['wnid'] or '-'}\t"
                         + (" ".join(f"#{h}" for h in e["hashtags"]) or "(hypernym)")
                         for e in self.entries[:rows])

    def summary(self) -> str:
        """One line: what was merged, dropped, matched and added."""
        i = self.info
        text = (f"{len(self.entries)} labels from {i['hashtags']} hashtags, {SENSE_RULE}; "
                f"{i['unmatched_hashtags']} hashtags not in WordNet {i['unmatched']}ped")
        if "targets" in i:
            text += (f"; {i['outside_targets']} hashtags outside the {i['targets']} targets dropped; "
                     f"covers {i['targets_covered']} of {i['targets']} target classes")
        if i.get("hierarchy"):
            text += f"; {i['hypernyms_added']} hypernyms added"
        return text + (f"; {i['images_covered']} of {i['images']} images "
                       f"({i['images_covered'] / max(i['images'], 1):.1%}) carry a label")


def wordnet_vocabulary(
    rows: Sequence[Sequence[str]],
    *,
    wordnet=None,
    top: int | None = None,
    unmatched: str = "drop",
    match: str | Path | None = None,
    map_to_target: bool = False,
    hierarchy: str | None = None,
    depth: int | None = None,
    root: str | None = None,
) -> WordNetVocabulary:
    """The WordNet vocabulary of images' hashtags (`rows`: one list of tag strings per image).

    Each hashtag goes to the noun synset of its lemma, its most frequent sense (WordNet's
    first synset); hashtags naming one synset merge into one entry. unmatched: "drop" or
    "keep" (as an entry of its own, labelled by the normalised tag) hashtags WordNet lacks.
    match: target labels (a file or comma list of WordNet ids, synset names or words; see
    fastssl.data.wordnet.read_targets): keep only hashtags whose synset is a target or a
    hyponym of one; map_to_target: label each by its nearest target instead (fewest hypernym
    steps; ties to the earlier target). top: keep the `top` most frequent entries (default
    all). hierarchy "wordnet": add every entry's hypernyms, at most `depth` steps up and only
    `root` and below when given (a WordNet id, synset name or word)."""
    if top is not None:
        check_int("top", top, low=1)
    check_choice("unmatched", unmatched, UNMATCHED)
    check_bool("map_to_target", map_to_target)
    if hierarchy is not None:
        check_choice("hierarchy", hierarchy, ("wordnet",))
    if depth is not None:
        check_int("depth", depth, low=1)
    if (depth is not None or root is not None) and hierarchy is None:
        raise ValueError("depth / root bound the hierarchy: give hierarchy='wordnet' "
                         "(--hierarchy wordnet) too")
    if map_to_target and match is None:
        raise ValueError("map_to_target (--map-to-target) needs the target labels: give match "
                         "(--match LABELS)")
    if match is not None and unmatched == "keep":
        raise ValueError("unmatched='keep' (--unmatched keep) contradicts match (--match): a hashtag "
                         "WordNet lacks is under no target")
    wordnet = wordnet if wordnet is not None else wn_.load_wordnet()
    images = Counter(t for row in rows for t in set(row))
    targets = wn_.read_targets(wordnet, match) if match is not None else None
    merged = _merge(images, wordnet, unmatched=unmatched, targets=targets, map_to_target=map_to_target)
    image_labels = [sorted({merged.label_of[t] for t in row if t in merged.label_of}) for row in rows]
    counts = Counter(label for labels in image_labels for label in labels)
    kept = sorted(counts, key=lambda label: (-counts[label], label))[:top]
    added: list[str] = []
    root_synset = wn_.parse_synset(wordnet, root, "root") if root is not None else None
    if hierarchy is not None:
        ancestors = set().union(*(wn_.hypernyms(merged.synset_of[label], depth=depth, root=root_synset)
                                  for label in kept if merged.synset_of[label] is not None))
        added = sorted({s.name() for s in ancestors} - set(kept))
        merged.synset_of.update({s.name(): s for s in ancestors})
    labels = kept + added
    ids = {label: i for i, label in enumerate(labels)}
    # A hashtag whose label `top` cut but the hierarchy brought back counts for it again.
    id_rows = [[ids[label] for label in row if label in ids] for row in image_labels]
    if hierarchy is not None:  # the expansion training applies with hierarchy="wordnet"
        id_rows = expand_hierarchy(id_rows, wn_.wordnet_parent_map(labels, wordnet=wordnet))
    final = Counter(c for row in id_rows for c in row)
    hashtags: dict[str, list[str]] = {}
    for tag, label in sorted(merged.label_of.items()):
        hashtags.setdefault(label, []).append(tag)
    entries = []
    for i, label in enumerate(labels):
        synset = merged.synset_of[label]
        named = synset is not None
        entry = {"tag": label, "synset": synset.name() if named else None,
                 "wnid": wn_.wnid(synset) if named else None, "lemmas": synset.lemma_names() if named else [],
                 "hashtags": hashtags.get(label, []), "count": final[i]}
        if targets is not None:
            entry["target"] = merged.target_of.get(label)
        entries.append(entry)
    entries.sort(key=lambda e: (-e["count"], e["tag"]))
    info = {"version": wordnet.get_version(), "sense": SENSE_RULE, "unmatched": unmatched, "top": top,
            "hashtags": len(images), "unmatched_hashtags": merged.not_in_wordnet,
            "images": len(rows), "images_covered": sum(1 for row in id_rows if row)}
    if targets is not None:
        covered = set().union(*(merged.under[label] for label in kept))
        info |= {"match": [wn_.wnid(s) for s in targets], "map_to_target": map_to_target,
                 "targets": len(targets), "targets_covered": len(covered), "outside_targets": merged.outside}
    if hierarchy is not None:
        info |= {"hierarchy": hierarchy, "depth": depth, "root": root_synset.name() if root_synset else None,
                 "hypernyms_added": len(added)}
    return WordNetVocabulary(entries, info)


@dataclass
class _Merged:
    """Raw hashtag -> label; per label its synset (None: a kept unmatched hashtag), its nearest
    target's WordNet id and the indices of every target it is under; hashtags left out."""

    label_of: dict[str, str] = field(default_factory=dict)
    synset_of: dict[str, object] = field(default_factory=dict)
    target_of: dict[str, str] = field(default_factory=dict)
    under: dict[str, set[int]] = field(default_factory=dict)
    not_in_wordnet: int = 0
    outside: int = 0


def _merge(hashtags, wordnet, *, unmatched: str, targets: list | None, map_to_target: bool) -> _Merged:
    merged = _Merged()
    index = {s: k for k, s in enumerate(targets or [])}
    for tag in hashtags:
        synset = wn_.noun_synset(wordnet, tag)
        if synset is None:
            merged.not_in_wordnet += 1
            if unmatched == "keep" and wn_.normalise_tag(tag):
                merged.label_of[tag] = wn_.normalise_tag(tag)
                merged.synset_of[merged.label_of[tag]] = None
            continue
        if targets is not None:
            distances = wn_.target_distances(synset, index)
            if not distances:
                merged.outside += 1
                continue
            nearest = targets[min(distances, key=lambda k: (distances[k], k))]
            synset = nearest if map_to_target else synset
            merged.target_of[synset.name()] = wn_.wnid(nearest)
            merged.under.setdefault(synset.name(), set()).update(distances)
        merged.label_of[tag] = synset.name()
        merged.synset_of[synset.name()] = synset
    return merged


def write_vocabulary(path: str | Path, vocabulary: WordNetVocabulary) -> None:
    """Write a WordNet vocabulary as JSON (the module docstring's format)."""
    if not str(path).endswith(".json"):
        raise ValueError(f"path (--out): a WordNet vocabulary is written as JSON (its entries list the "
                         f"hashtags each label stands for); give a .json path, got {str(path)!r}")
    Path(path).write_text(json.dumps(vocabulary.to_json(), indent=1) + "\n")


def load_tag_ids(path: str | Path) -> dict[str, int]:
    """Raw tag -> label id for a vocabulary file: each label itself, and with WordNet entries
    every hashtag merged into it (so shards' captions map to their synsets)."""
    tags = load_vocabulary(path)
    ids = {tag: i for i, tag in enumerate(tags)}
    if not str(path).endswith(".json"):
        return ids
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    entries = obj.get("entries") if isinstance(obj, dict) else None
    if entries is None:
        return ids
    if not isinstance(entries, list) or len(entries) != len(tags):
        raise ValueError(f"{path}: \"entries\" must be a list with one entry per tag ({len(tags)})")
    for i, entry in enumerate(entries):
        for tag in entry.get("hashtags", []) if isinstance(entry, dict) else []:
            if ids.setdefault(tag, i) != i:
                raise ValueError(f"{path}: hashtag {tag!r} is listed under both {tags[ids[tag]]!r} "
                                 f"and {tags[i]!r}")
    return ids


__all__ = ["SENSE_RULE", "WordNetVocabulary", "load_tag_ids", "wordnet_vocabulary", "write_vocabulary"]

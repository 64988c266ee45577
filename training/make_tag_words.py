"""Map the 1000 ImageNet classes of the encoder's classifier head onto caption words.

    python -m training.make_tag_words --text ../shared/data/text --flickr ../shared/data/flickr8k \\
        --out captioner/data/imagenet_words.json

An ImageNet class is a WordNet 3.0 noun synset (wnid "n02123045" = noun offset 2123045, "tabby,
tabby cat"). People captioning a photo of a tabby write "cat", not "tabby", so each class gets the
most specific word on its hypernym chain that captions actually use:

1. Walk the synset and its hypernyms breadth-first, most specific first (WordNet's pointer order
   breaks ties). The walk stops at the synsets of `STOP`: upper-level concepts ("animal",
   "device", "container", "food", "vehicle", "tool", ...) whose words fit almost anything, so a
   tag made of them would say nothing about the photo.
2. Candidate words, synset by synset: for the class itself, its first name ("kite", "mouse"),
   its other single-word names in their everyday sense, and the head noun of a multi-word name
   ("tiger cat" -> "cat", "school bus" -> "bus") if that noun means the class or one of its
   ancestors in some WordNet sense ("sea lion" -/-> "lion", "hot dog" -/-> "dog"). For an
   ancestor, only words whose most frequent WordNet sense lies on the chain: "toy" (as in "toy
   dog") or "cat" (as in "big cat") mean something else in captions. Plural lemmas are made
   singular ("cows" -> "cow").
3. Counts come from the TRAINING caption text (the Flickr8k train split, Flickr30k and COCO
   val2017 captions, tokenised with `captioner.vocab.tokenize`), a word counted with its plural.
   The first candidate seen at least `--min-count` (50) times wins, unless a more general
   candidate is `--ratio` (50) times as frequent: "greyhound" (103) and "poodle" (56) lose to
   "dog" (9,775), "laptop" (748) keeps its word against "computer" (1,004). The threshold 50
   keeps "monkey" (59), "butterfly" (65), "pig" (54) and "strawberry" (62), which 100 would lose;
   at 30 vague words come in ("utensil", "weapon", "apparatus") beside rare ones ("snake", 33).
4. `OVERRIDES`: about 30 classes, checked by hand in the printed mapping, where the chosen word
   means something else in captions ("pitcher", "fly", "chest", "can"): another word or none.

A class with no word maps to null and never produces a tag. Each word also gets its forms: the
word, its plural (WordNet's irregular plurals in `noun.exc`, else the regular English rule) and its
possessive ("dog's"), each kept only if the training text has it. A caption "names" a word when
it contains any of its forms.

WordNet is read from Debian's `wordnet-base` files (`data.noun`, `index.noun`, `noun.exc`) by the
small parser below: the format is plain text, and nltk (whose reader refuses paths outside its own
data folders) stays out of the dependencies. The output is deterministic; `training.calibrate_tagger`
adds the calibration of the tagger's confidences to the same file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from captioner.files import write_atomically
from captioner.vocab import tokenize

from .data import DataSpec, load_dataset

FORMAT_VERSION = 1
DEFAULT_MIN_COUNT = 50
DEFAULT_RATIO = 50.0
DEFAULT_WORDNET = "/usr/share/wordnet"

# Synsets where the walk stops (neither they nor their ancestors give words). Deliberately
# chosen: each is a common caption word, or the parent of one, that would make a vague tag:
# "animal" for a platypus, "device" for a barometer, "food" for a hotpot, "container" for a
# crate. Specific enough words below them ("dog", "bird", "car", "bottle", "fruit") survive.
STOP = {
    "n00001740": "entity",
    "n00001930": "physical entity",
    "n00002684": "object, physical object",
    "n00003553": "whole, unit",
    "n00004258": "living thing, animate thing",
    "n00004475": "organism, being",
    "n00015388": "animal, animate being, beast, brute, creature, fauna",
    "n01317541": "domestic animal, domesticated animal",
    "n01466257": "chordate",
    "n01471682": "vertebrate, craniate",
    "n01861778": "mammal, mammalian",
    "n01886756": "placental, placental mammal, eutherian, eutherian mammal",
    "n01905661": "invertebrate",
    "n00007846": "person, individual, someone, somebody, mortal, soul",
    "n00021939": "artifact, artefact",
    "n03575240": "instrumentality, instrumentation",
    "n03183080": "device",
    "n03294048": "equipment",
    "n03563967": "implement",
    "n03574816": "instrument",
    "n03094503": "container",
    "n03122748": "covering",
    "n03076708": "commodity, trade good, good",
    "n04341686": "structure, construction",
    "n04564698": "way",
    "n03839993": "obstruction, obstructor, obstructer, impediment, impedimenta",
    "n03733547": "means",
    "n04014297": "protective covering, protective cover, protection",
    "n03748886": "merchandise, ware, product",
    "n00002452": "thing",  # a separate and self-contained entity
    "n04424218": "thing",  # an artifact
    "n04424418": "thing",  # an entity that is not named
    "n00019128": "natural object",
    "n09287968": "geological formation, formation",
    "n00017222": "plant, flora, plant life",
    "n07566340": "foodstuff, food product",
    "n00021265": "food, nutrient",
    "n07555863": "food, solid food",
    "n07570720": "nutriment, nourishment, nutrition, sustenance, aliment, alimentation, victuals",
    "n00020827": "matter",

    "n03129123": "creation",
    "n04007894": "product, production",
    "n03309808": "fabric, cloth, material, textile",
    "n04524313": "vehicle",
    "n03100490": "conveyance, transport",
    "n03051540": "clothing, article of clothing, vesture, wear, wearable, habiliment",
    "n03093574": "consumer goods",
    "n07705711": "produce, green goods, green groceries, garden truck",
    "n03699975": "machine",
    "n03932670": "piece of cloth, piece of material",
    "n04451818": "tool",
    "n03405725": "furniture, piece of furniture, article of furniture",
    "n02796623": "barrier",
    "n03540267": "hosiery, hose",  # captions' hoses water gardens
    "n02756098": "attire, garb, dress",
    "n03956922": "plant, works, industrial plant",  # captions' plants grow
    "n03419014": "garment",
    "n04377057": "system",
    "n03354350": "fixings, trimmings",
    "n07809096": "ingredient, fixings",  # "fixings" for a sauce
}

# Classes whose rule-chosen word means something else in captions (WordNet has the word in this
# sense, captions use another): checked by hand in the printed mapping, fixed here.
OVERRIDES: dict[str, str | None] = {
    "n01608432": "bird",  # kite (the bird); captions' kites are toys
    "n02012849": "bird",  # crane (the bird); captions' cranes lift loads
    "n02190166": None,  # fly; captions' "fly" is the verb
    "n02229544": None,  # cricket (the insect); captions' cricket is the sport
    "n03954731": None,  # plane (carpenter's); captions' planes fly
    "n03929660": None,  # pick (plectrum)
    "n04037443": "car",  # racer (race car); captions' racers are people
    "n03014705": None,  # chest (the box); captions' chests are torsos
    "n03950228": None,  # pitcher, ewer; captions' pitchers throw baseballs
    "n03764736": None,  # milk can -> "can", a verb in captions
    "n03637318": "lamp",  # lampshade -> "shade", shadow in captions
    "n04264628": "keyboard",  # space bar -> "bar"
    "n09421951": None,  # sandbar -> "bar"
    "n03888605": None,  # parallel bars -> "bar"
    "n07248320": "book",  # book jacket -> "jacket", clothing in captions
    "n06359193": None,  # web site -> "site"
    "n03935335": None,  # piggy bank -> "bank"
    "n03657121": None,  # lens cap -> "cap", a hat in captions
    "n03920288": None,  # Petri dish -> "dish", food in captions
    "n13133613": "corn",  # ear (of corn) -> "ear", a body part in captions
    "n12620546": None,  # hip (rose hip), a body part in captions
    "n04049303": None,  # rain barrel -> "pool"
    "n03355925": "pole",  # flagpole -> "stick"
    "n03947888": "ship",  # pirate ship -> "pirate", a person in captions
    "n04458633": None,  # totem pole -> "decoration"
    "n11879895": None,  # rapeseed (fields of yellow flowers) -> "fruit"
    "n03770439": "skirt",  # miniskirt -> "mini"
    "n02892201": None,  # brass (memorial plaque); captions' brass is the metal or the band
    "n03492542": None,  # hard disc -> "disc", a frisbee in captions
    "n03584829": None,  # iron (smoothing); captions' iron is the metal
    "n03804744": None,  # nail; captions' nails are fingernails
    "n03032252": "theater",  # cinema -> "house" (the more general "building" outnumbers "theater")
    "n03529860": None,  # home theater -> "building"
    "n02403003": "cow",  # ox -> "cattle"; captions say cow
    "n02992529": "phone",  # cellular telephone -> "cellphone"; captions say (cell) phone
    "n03461385": "store",  # grocery store -> "grocery"
    "n03594734": "jeans",  # jean -> "jean"
    "n03595614": "shirt",  # jersey, T-shirt -> "jersey", a sports shirt in captions
    "n03743016": None,  # megalith -> "monument"
    "n03877472": "pajamas",  # pajama -> "pajama"
    "n04355933": "sunglasses",  # sunglass -> "sunglass"
    "n04356056": "sunglasses",
    "n04447861": "toilet",  # toilet seat -> "seat"; captions name the toilet
    "n04487081": "bus",  # trolleybus -> "coach", a person in captions
    "n04509417": None,  # unicycle: never in a caption of the dev photos it fires on (bikes, mostly)
}


@dataclass
class Synset:
    offset: str  # "n02123045"
    lemmas: list[str]  # lowercased, spaces for underscores, WordNet's order
    hypernyms: list[str]  # hypernyms and instance hypernyms, WordNet's order


class WordNet:
    """The noun part of a WordNet 3.0 database directory (Princeton's file layout)."""

    def __init__(self, root: str | os.PathLike = DEFAULT_WORDNET):
        root = Path(root)
        if not (root / "data.noun").is_file():
            raise FileNotFoundError(f"no WordNet data.noun under {root} (Debian: apt-get install wordnet-base)")
        self.synsets: dict[str, Synset] = {}
        for line in open(root / "data.noun", encoding="utf-8"):
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            offset, count = fields[0], int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ").lower() for w in fields[4:4 + 2 * count:2]]
            rest = fields[4 + 2 * count:]
            pointers = int(rest[0])
            hypernyms = [f"n{rest[1 + 4 * i + 1]}" for i in range(pointers)
                         if rest[1 + 4 * i] in ("@", "@i") and rest[1 + 4 * i + 2] == "n"]
            self.synsets[f"n{offset}"] = Synset(f"n{offset}", lemmas, hypernyms)
        self.senses: dict[str, list[str]] = {}  # lemma -> synsets, most frequent sense first
        for line in open(root / "index.noun", encoding="utf-8"):
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[6 + pointer_count:6 + pointer_count + synset_count]
            self.senses[lemma.replace("_", " ")] = [f"n{o}" for o in offsets]
        self.plurals: dict[str, list[str]] = {}  # singular -> irregular plurals
        for line in open(root / "noun.exc", encoding="utf-8"):
            plural, *singulars = line.split()
            for singular in singulars:
                self.plurals.setdefault(singular.replace("_", " "), []).append(plural.replace("_", " "))

    def walk(self, offset: str, stop: Iterable[str] = ()) -> list[str]:
        """The synset and its ancestors, breadth-first (most specific first), not entering `stop`."""
        stop = set(stop)
        seen, order, queue = {offset}, [], deque([offset])
        while queue:
            current = queue.popleft()
            if current in stop:
                continue
            order.append(current)
            for parent in self.synsets[current].hypernyms:
                if parent not in seen:
                    seen.add(parent)
                    queue.append(parent)
        return order


def plural_forms(word: str, wordnet: WordNet) -> list[str]:
    """Candidate plurals: WordNet's irregular ones ("mice", "busses") and the regular English rule
    ("buses"); the caller keeps those the captions use."""
    if re.search(r"(s|x|z|ch|sh)$", word):
        regular = word + "es"
    elif re.search(r"[^aeiou]y$", word):
        regular = word[:-1] + "ies"
    else:
        regular = word + "s"
    return list(dict.fromkeys([*wordnet.plurals.get(word, []), regular]))


def word_forms(word: str, wordnet: WordNet, counts: Counter) -> list[str]:
    """The word, its plurals and its possessive, those the training text has (the word first)."""
    candidates = [word, *plural_forms(word, wordnet), word + "'s"]
    return [form for i, form in enumerate(candidates) if (i == 0 or counts[form] > 0) and form not in candidates[:i]]


def singular(lemma: str, wordnet: WordNet) -> str:
    """A plural lemma ("cows" in "cattle, cows, kine", "sunglasses") as its singular noun."""
    for word, plurals in wordnet.plurals.items():
        if lemma in plurals and word in wordnet.senses:
            return word
    if lemma.endswith("s") and lemma[:-1] in wordnet.senses and lemma in plural_forms(lemma[:-1], wordnet):
        return lemma[:-1]
    if lemma.endswith("es") and lemma[:-2] in wordnet.senses and lemma in plural_forms(lemma[:-2], wordnet):
        return lemma[:-2]
    return lemma


def candidates(offset: str, wordnet: WordNet, stop: Iterable[str] = STOP) -> list[tuple[str, str]]:
    """(word, synset) pairs the class could be tagged with, most specific first."""
    chain = wordnet.walk(offset, stop)
    ancestors = set(chain)

    def dominant(word: str) -> bool:  # the word's most frequent sense is on the chain
        senses = wordnet.senses.get(word, [])
        return bool(senses) and senses[0] in ancestors

    def names_chain(word: str) -> bool:  # some sense of the word is on the chain
        return any(sense in ancestors for sense in wordnet.senses.get(word, []))

    found: list[tuple[str, str]] = []
    for depth, synset in enumerate(chain):
        lemmas = wordnet.synsets[synset].lemmas
        singles = [lemma for lemma in lemmas if tokenize(lemma) == [lemma]]
        heads = [tokenize(lemma)[-1] for lemma in lemmas if len(tokenize(lemma)) > 1]
        if depth == 0:  # the class's own name, any other name in its everyday sense, heads naming the chain
            words = [w for w in singles if w == lemmas[0] or dominant(w)] + [w for w in heads if names_chain(w)]
        else:  # an ancestor's words only in their everyday sense ("toy" for toy dogs: no)
            words = [w for w in singles + heads if dominant(w)]
        for word in words:
            word = singular(word, wordnet)
            if word not in (w for w, _ in found):
                found.append((word, synset))
    return found


def choose_word(offset: str, wordnet: WordNet, counts: Counter, min_count: int, ratio: float,
                stop: Iterable[str] = STOP) -> str | None:
    """The first frequent candidate that no later candidate outnumbers `ratio` times."""
    def count(word: str) -> int:
        return sum(counts[form] for form in [word, *plural_forms(word, wordnet)])

    frequent = [(word, count(word)) for word, _ in candidates(offset, wordnet, stop) if count(word) >= min_count]
    for i, (word, n) in enumerate(frequent):
        if all(later < ratio * n for _, later in frequent[i + 1:]):
            return word
    return None


def count_words(text_dir: Path, flickr_dir: Path) -> tuple[Counter, list[str]]:
    """Token counts of the training captions, and the files they came from."""
    counts: Counter = Counter()
    for sample in load_dataset(DataSpec(format="flickr", path=str(flickr_dir)), "train"):
        for caption in sample.captions:
            counts.update(tokenize(caption))
    sources = [f"{flickr_dir.name}/captions.txt (train split)"]
    for name in ("flickr30k_captions.csv", "coco_val2017_captions.csv"):
        with open(text_dir / name, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                counts.update(tokenize(row["caption"]))
        sources.append(f"{text_dir.name}/{name}")
    return counts, sources


def imagenet_classes() -> list[tuple[str, str]]:
    """(wnid, name) of the 1000 ImageNet-1k classes, in the classifier's order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [(info.index_to_label_name(i), info.index_to_description(i)) for i in range(info.num_classes())]


def build_mapping(wordnet: WordNet, counts: Counter, *, min_count: int, ratio: float, sources: list[str]) -> dict:
    classes, used = [], {}
    for wnid, name in imagenet_classes():
        if wnid not in wordnet.synsets:
            raise ValueError(f"ImageNet class {wnid} ({name}) is not a WordNet 3.0 noun synset")
        word = OVERRIDES[wnid] if wnid in OVERRIDES else choose_word(wnid, wordnet, counts, min_count, ratio)
        classes.append({"wnid": wnid, "name": name, "word": word})
        if word is not None:
            used[word] = None
    words = {}
    for word in sorted(used):
        forms = word_forms(word, wordnet, counts)
        words[word] = {"forms": forms, "count": sum(counts[f] for f in forms)}
    return {
        "format_version": FORMAT_VERSION,
        "settings": {
            "min_count": min_count,
            "ratio": ratio,
            "wordnet": "WordNet 3.0 (data.noun, index.noun, noun.exc)",
            "text": sources,
            "tokenizer": "captioner.vocab.tokenize",
            "stop": sorted(STOP),
            "overrides": dict(sorted(OVERRIDES.items())),
        },
        "calibration": None,  # filled in by training.calibrate_tagger
        "classes": classes,
        "words": words,
    }


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Atomically, one class per line (small diffs when the mapping changes)."""
    head = {k: v for k, v in data.items() if k not in ("classes", "words")}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "classes": [')
    lines.append(",\n".join(f"    {json.dumps(c)}" for c in data["classes"]))
    lines.append("  ],")
    lines.append('  "words": {')
    lines.append(",\n".join(f"    {json.dumps(w)}: {json.dumps(v)}" for w, v in data["words"].items()))
    lines.append("  }")
    lines.append("}")
    write_atomically(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="folder with flickr30k_captions.csv and coco_val2017_captions.csv")
    parser.add_argument("--flickr", required=True, help="the Flickr8k folder (captions.txt, splits/train.txt)")
    parser.add_argument("--out", default="captioner/data/imagenet_words.json")
    parser.add_argument("--wordnet", default=DEFAULT_WORDNET, help="WordNet 3.0 database folder")
    parser.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                        help="how often a word (with its plural) must occur in the training captions")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                        help="skip a word when a more general word of its class is this many times as frequent")
    args = parser.parse_args(argv)
    wordnet = WordNet(args.wordnet)
    counts, sources = count_words(Path(args.text), Path(args.flickr))
    data = build_mapping(wordnet, counts, min_count=args.min_count, ratio=args.ratio, sources=sources)
    write_json(data, args.out)
    mapped = [c for c in data["classes"] if c["word"]]
    print(f"{len(mapped)} of {len(data['classes'])} classes mapped to {len(data['words'])} distinct words "
          f"(min count {args.min_count}, ratio {args.ratio:g}); written to {args.out}")
    by_word = Counter(c["word"] for c in mapped)
    print("words with most classes:", ", ".join(f"{w} {n}" for w, n in by_word.most_common(12)))
    first = list({c["word"]: c for c in reversed(mapped)}.values())[::-1]  # one class per word
    step = max(1, len(first) // 30)
    for entry in first[::step][:30]:
        print(f"  {entry['wnid']} {entry['name'][:40]:40s} -> {entry['word']} "
              f"{data['words'][entry['word']]['forms']}")

if __name__ == "__main__":
    main()

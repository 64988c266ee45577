"""Properties of each word of a caption, computed from the words alone, for `training.cells`.

No tagger and no download: word classes come from a small hand-written lexicon of the function
words, colours, numbers, adjectives and common verbs of caption English, plus suffix rules (-ing
is a verb unless listed as a noun, -ed an adjective as in "a painted wall", -ly an adverb, an -s
noun is plural). Whatever is none of these is a noun. The rules are wrong on some words ("a painting" is read as a verb; adjectives missing from
the list count as nouns); on captions, which are mostly noun phrases, they are right on most words.

All properties are reading-aligned: the value at word t describes word t, the word the decoder has
just read (its state after reading it is what `training.cells` records).
"""

from __future__ import annotations

from dataclasses import dataclass

DETERMINERS = frozenset(
    "a an the this these those some another his her their its each every any no my your our".split())
COUNTS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve dozen several many few multiple numerous "
    "lots".split()) | frozenset(str(n) for n in range(100))
COLOURS = frozenset(
    "red blue green yellow black white brown orange pink purple gray grey tan blond blonde silver gold golden "
    "beige maroon turquoise navy teal violet colorful colourful colored coloured multicolored multicolor "
    "multicoloured".split())
PREPOSITIONS = frozenset(
    "in on of with at to for from by near into through over under out off down up behind across along around "
    "beside besides onto toward towards against past above below between inside outside underneath beneath "
    "during among amongst upon like atop via about without within throughout alongside beyond next".split())
# Finite and base forms of the verbs captions use most; -ing forms are found by suffix.
VERBS = frozenset(
    "is are be been was were has have sits sit stands stand runs run jumps jump plays play holds hold looks look "
    "walks walk rides ride wears wear waits wait climbs climb lies lie lays lay poses pose smiles smile swims "
    "swim throws throw catches catch kicks kick eats eat drinks drink talks talk works perform performs dances "
    "dance reads read sings sing stares stare leans lean carries carry pulls pull pushes push hits hit skis "
    "surfs surf flies fly sleeps sleep rests rest gets get makes make takes take uses use watch "
    "watches prepares prepare shows show appears appear covers goes go travels travel crosses cross "
    "laughs laugh sleeps plays races race hangs hang splashes splash digs dig reaches reach "
    "grabs grab chases chase fights fight kisses kiss hugs hug tries try does do".split())
ING_NOUNS = frozenset(
    "building buildings clothing something anything nothing everything ceiling evening morning wedding railing "
    "string spring swing thing king ring wing sibling pudding stocking awning icing frosting bedding lightning "
    "ping sling".split())
ADJECTIVES = frozenset(
    "young little large small other older old big long short tall elderly bright busy open full empty wet dry "
    "muddy snowy grassy sandy rocky wooden asian african american male female dark light high low ready "
    "different beautiful sunny crowded cute happy shirtless outdoor indoor public professional tiny huge giant "
    "pretty fancy hard soft clear calm cold hot warm new same whole dirty dusty rainy cloudy leafy furry fluffy "
    "shaggy curly hairy tiled paved lit striped plaid haired covered dressed seated parked filled surrounded "
    "gathered shaped topped dried fried stuffed sliced wide narrow deep shallow heavy fat thin skinny adult "
    "teenage own various single double multiple electric "
    "tropical traditional favorite famous ethnic".split())
OTHER = frozenset(
    "and or but while as who which that what where when there it he she they him them his her their its "
    "something someone somebody anyone everyone very together just also not then so than too here while both "
    "all each how why this if because only well away ahead after before close nearby outdoors indoors others can "
    "will".split())
ED_NOUNS = frozenset("speed seed weed bread breed shred steed".split())
IRREGULAR_PLURALS = frozenset("people men women children feet teeth mice geese police cattle sheep".split())
SINGULAR_S = frozenset(
    "bus gas canvas lens news grass glass dress class cross chess mattress bus walrus cactus circus octopus "
    "tennis bus mess boss kiss pass moss bass dress process chaos atlas bonus campus".split())


@dataclass(frozen=True)
class Property:
    name: str  # key in cells.json
    label: str  # how a reader names a unit that tracks it ("unit 212 (c): words left")
    binary: bool  # scored by ROC AUC (binary) or Spearman correlation (numeric)
    group: str = "word"  # word: of the word just read; context: needs memory of the caption; attention


TEXT_PROPERTIES = (
    Property("position", "position in caption", False, "context"),
    Property("words_left", "words left", False, "context"),
    Property("noun", "noun", True),
    Property("colour", "colour word", True),
    Property("count", "count word", True),
    Property("verb", "verb", True),
    Property("preposition", "preposition", True),
    Property("determiner", "article/determiner", True),
    Property("noun_phrase", "in a noun phrase", True, "context"),
    Property("plural", "plural noun", True),
    Property("subject_named", "subject already named", True, "context"),
)


def word_class(word: str) -> str:
    """One of determiner, count, colour, preposition, verb, adjective, adverb, other, noun."""
    for name, words in (("determiner", DETERMINERS), ("count", COUNTS), ("colour", COLOURS),
                        ("preposition", PREPOSITIONS), ("verb", VERBS), ("adjective", ADJECTIVES),
                        ("other", OTHER)):
        if word in words:
            return name
    if word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS:
        return "verb"
    if word.endswith("ed") and len(word) > 4 and word not in ED_NOUNS:  # participles: "painted wall"
        return "adjective"
    if word.endswith("ly") and len(word) > 4 and word not in ("family", "belly", "jelly", "fly"):
        return "adverb"
    if len(word) < 2 or not word.isalpha():
        return "other"
    return "noun"


def is_plural(word: str) -> bool:
    """For a noun: plural by the irregular list or an -s ending that is not a singular one."""
    if word in IRREGULAR_PLURALS:
        return True
    return word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")) and word not in SINGULAR_S


def noun_phrases(classes: list[str]) -> list[bool]:
    """Marks the words of each determiner-led noun phrase: from a determiner or count word through
    adjectives, colours and nouns ("brown and white" included) to its head noun, the last noun
    before a word that is not one. A span that meets anything else before a noun is not marked;
    bare nouns ("dogs play") are not noun phrases here."""
    inside = [False] * len(classes)
    modifiers = ("adjective", "colour", "count", "adverb")
    start = None
    for t, kind in enumerate(classes):
        if start is None:
            if kind in ("determiner", "count"):
                start = t
            continue
        if kind == "noun":
            if t + 1 == len(classes) or classes[t + 1] != "noun":  # the head
                inside[start:t + 1] = [True] * (t + 1 - start)
                start = None
        elif kind in modifiers or kind == "determiner" and t == start + 1:  # "all the", "the two"
            continue
        elif kind == "other" and t > start and classes[t - 1] in ("adjective", "colour") \
                and t + 1 < len(classes) and classes[t + 1] in ("adjective", "colour"):  # "brown and white"
            continue
        else:
            start = t if kind in ("determiner", "count") else None
    return inside


def caption_properties(words: list[str]) -> dict[str, list[float]]:
    """words (T,) -> property name -> (T,) values, one per word, as listed in TEXT_PROPERTIES."""
    n = len(words)
    classes = [word_class(w) for w in words]
    nouns = [k == "noun" for k in classes]
    first_noun = nouns.index(True) if any(nouns) else n
    values = {
        "position": [t + 1 for t in range(n)],
        "words_left": [n - 1 - t for t in range(n)],  # 0 on the last word: <eos> comes next
        "noun": nouns,
        "colour": [k == "colour" for k in classes],
        "count": [k == "count" for k in classes],
        "verb": [k == "verb" for k in classes],
        "preposition": [k == "preposition" for k in classes],
        "determiner": [k == "determiner" for k in classes],
        "noun_phrase": noun_phrases(classes),
        "plural": [noun and is_plural(w) for noun, w in zip(nouns, words)],
        "subject_named": [t >= first_noun for t in range(n)],  # the first noun read, at or before t
    }
    return {name: [float(v) for v in column] for name, column in values.items()}

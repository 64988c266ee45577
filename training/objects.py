"""Which of the 80 COCO object categories a caption mentions, for object-hallucination metrics
(CHAIR, Rohrbach et al. 2018, "Object Hallucination in Image Captioning").

The synonym lists follow CHAIR's: many words name one category ("man", "girl", "surfer" ->
person; "bike" -> bicycle; "puppy" -> dog), two- and three-word names are matched as phrases
before their words ("hot dog" is not a dog, "teddy bear" not a bear, "fire hydrant", "cell
phone"), and plurals count ("two men riding bikes" -> {person, bicycle}). As in CHAIR, "baby"
alone is a person but "baby elephant" only an elephant, and "passenger train" is a train with no
person; a few phrases name no object at all ("train tracks", "bus stop", "home plate").

Beyond CHAIR, where it is cheap: "orange" (and "baseball", "soccer", ...) followed by a word that is
not a function word describes that word ("an orange shirt", "a baseball cap"): no fruit, no ball;
"male"/"female" before an animal describe it; and "bow" alone (of a boat, of a violin) is no tie.
Word matching cannot tell every sense apart ("a computer mouse" and "a field mouse" both count as
the COCO `mouse`); the figures share that limit with CHAIR's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from captioner.vocab import tokenize

# Category -> the words and phrases that name it (singular; plurals are derived).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider",
        "children", "baby", "worker", "passenger", "sister", "brother", "biker", "policeman", "policewoman", "cop",
        "officer", "lady", "cowboy", "cowgirl", "bride", "groom", "male", "female", "guy", "traveler", "mother",
        "father", "mom", "dad", "gentleman", "pitcher", "batter", "catcher", "umpire", "player", "skier",
        "snowboarder", "skater", "skateboarder", "surfer", "swimmer", "runner", "cyclist", "bicyclist",
        "motorcyclist", "climber", "hiker", "dancer", "performer", "musician", "toddler", "teenager", "teen",
        "student", "driver", "soldier", "doctor", "nurse", "fireman", "firefighter", "shopper", "tourist",
        "spectator", "friend", "husband", "wife", "son", "daughter", "grandmother", "grandfather", "infant",
        "youngster", "pedestrian", "jockey", "fisherman", "vendor", "businessman", "businesswoman",
        "kiteboarder", "windsurfer", "wakeboarder", "goalie", "referee", "coach", "athlete", "tennis player",
        "baseball player", "soccer player", "football player", "basketball player", "volleyball player",
    ),
    "bicycle": ("bicycle", "bike", "bycicle", "tricycle", "mountain bike"),
    "car": ("car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
            "taxicab", "limo", "limousine", "taxi", "race car", "police car"),
    "motorcycle": ("motorcycle", "motor bike", "motor cycle", "motorbike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus",
                 "biplane", "seaplane", "airliner", "aeroplane"),
    "bus": ("bus", "minibus", "trolley", "double decker", "school bus"),
    "train": ("train", "locomotive", "tramway", "tram", "caboose", "subway train"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck", "fire truck", "pickup truck"),
    "boat": ("boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
             "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler",
             "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry", "paddleboat", "lifeboat",
             "freighter", "steamboat", "riverboat", "battleship", "steamship", "raft", "gondola"),
    "traffic light": ("traffic light", "street light", "traffic signal", "stop light", "streetlight",
                      "stoplight"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "pew", "park bench"),
    "bird": ("bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
             "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey",
             "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird",
             "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot",
             "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey",
             "oriole", "cowbird", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin", "vulture",
             "condor", "macaw", "peafowl", "cockatoo", "songbird", "hen", "eagle", "hawk"),
    "cat": ("cat", "kitten", "feline", "tabby", "kitty"),
    "dog": ("dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
            "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt", "doggy",
            "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound", "retriever",
            "brindle", "hound", "whippet", "husky", "dalmatian", "german shepherd", "sheperd", "shepherd dog"),
    "horse": ("horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
              "mustang", "clydesdale", "bronc", "bronco"),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": ("cow", "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison",
            "longhorn"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "cub"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "wallet", "purse", "briefcase"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee", "frisbe", "flying disc"),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard", "snow board"),
    "sports ball": ("sports ball", "ball", "soccer ball", "tennis ball", "beach ball", "basketball",
                    "volleyball", "softball", "football", "baseball", "soccer"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "baseball mitt", "mitt", "catcher's mitt"),
    "skateboard": ("skateboard", "skate board", "longboard"),
    "surfboard": ("surfboard", "surf board", "skimboard", "shortboard", "wakeboard", "paddleboard",
                  "paddle board", "boogie board", "bodyboard"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup", "mug"),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake"),
    "chair": ("chair", "seat", "stool", "armchair", "highchair", "high chair"),
    "couch": ("couch", "sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("potted plant", "houseplant", "house plant", "plant pot", "flower pot", "flowerpot"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty", "toilet seat"),
    "tv": ("tv", "monitor", "televison", "television"),
    "laptop": ("laptop", "computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": ("mouse",),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone",
                   "smart phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stovetop", "stove", "stove top oven"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear", "teddy"),
    "hair drier": ("hair drier", "hairdryer", "hair dryer", "blow dryer", "blowdryer", "blow drier",
                   "hairdrier"),
    "toothbrush": ("toothbrush", "tooth brush"),
}
CATEGORIES: tuple[str, ...] = tuple(SYNONYMS)  # the 80, in COCO's order

# Phrases that contain an object word but name no object of their own.
NOT_OBJECTS = ("train track", "train tracks", "railroad track", "railroad tracks", "train station",
               "bus stop", "bus station", "home plate", "jet ski", "jet skis", "man made", "bike path",
               "bike lane", "dog park", "ski slope", "ski slopes", "ski lift", "ski resort", "tennis court",
               "baseball field", "baseball diamond", "baseball game", "football field", "soccer field",
               "soccer game", "football game", "basketball court", "basketball game", "table tennis",
               "car park", "orange juice")

# A person word before an animal or vehicle only describes it: "baby elephant" is an elephant,
# not a person and an elephant; "passenger train" a train.
_ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
_VEHICLES = {"airplane", "bus", "train", "car", "boat"}
_DESCRIBING = {"baby": _ANIMALS, "babies": _ANIMALS, "male": _ANIMALS, "female": _ANIMALS,
               "passenger": _VEHICLES, "passengers": _VEHICLES}
# Words that are also adjectives: the object only when the next word is absent or one of
# _FUNCTION_WORDS ("an orange on a plate", "kicking a football"); before any other word they
# describe it ("an orange shirt", "a baseball cap").
_ALSO_ADJECTIVES = {"orange", "football", "baseball", "soccer", "basketball", "volleyball", "softball"}
_FUNCTION_WORDS = {"and", "or", "on", "in", "with", "is", "are", "of", "at", "next", "near", "by", "to", "from",
                   "that", "which", "for", "under", "inside", "beside", "here", "there", "sitting", "sits",
                   "lying", "laying", "slice", "slices", "wedge", "wedges", "peel", "half", "halves", "tree", "trees"}

_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
              "goose": "geese", "ox": "oxen", "calf": "calves", "knife": "knives", "pocketknife": "pocketknives",
              "sheep": "sheep", "cattle": "cattle", "people": "peoples", "children": "children", "oxen": "oxen",
              "skis": "skis", "scissors": "scissors", "broccoli": "broccoli", "luggage": "luggage",
              "bison": "bison", "buffalo": "buffaloes", "fish": "fish", "wife": "wives"}


def _plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("man"):
        return word[:-3] + "men"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _normalise(token: str) -> str:
    """Possessives name the same object: "dog's" -> "dog", "men's" -> "men"."""
    for suffix in ("'s", "’s", "'", "’"):
        if token.endswith(suffix) and len(token) > len(suffix):
            return token[: -len(suffix)]
    return token


def _phrase_table() -> dict[tuple[str, ...], str | None]:
    table: dict[tuple[str, ...], str | None] = {}
    for category, names in SYNONYMS.items():
        for name in names:
            words = tuple(_normalise(t) for t in tokenize(name))
            plural = (*words[:-1], _plural(words[-1]))
            table[words] = category
            table.setdefault(plural, category)
    table[("bow",)] = None  # only "bow tie" is a tie
    for phrase in NOT_OBJECTS:
        table[tuple(_normalise(t) for t in tokenize(phrase))] = None
    return table


_PHRASES = _phrase_table()
_LONGEST = max(len(p) for p in _PHRASES)


def _mentions(tokens: list[str]) -> list[tuple[int, int, str | None]]:
    """(start, end, category or None) of each longest phrase match, left to right."""
    found = []
    i = 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            key = tuple(tokens[i: i + n])
            if key in _PHRASES:
                found.append((i, i + n, _PHRASES[key]))
                i += n
                break
        else:
            i += 1
    return found


def mentioned_objects(caption: str) -> set[str]:
    """The COCO categories (canonical names, e.g. "person", "hot dog") that `caption` names."""
    tokens = [_normalise(t) for t in tokenize(caption)]
    matches = _mentions(tokens)
    objects: set[str] = set()
    for k, (start, end, category) in enumerate(matches):
        if category is None:
            continue
        following = matches[k + 1] if k + 1 < len(matches) else None
        adjacent = following is not None and following[0] == end
        if end - start == 1 and adjacent and following[2] in _DESCRIBING.get(tokens[start], ()):
            continue  # "baby elephant", "passenger train": the animal or vehicle only
        if end - start == 1 and tokens[start] in _ALSO_ADJECTIVES:
            after = tokens[end] if end < len(tokens) else None
            if after is not None and after not in _FUNCTION_WORDS:
                continue  # "an orange shirt", "a baseball cap"
        objects.add(category)
    return objects


def load_instances(path: str | os.PathLike) -> dict[str, set[str]]:
    """COCO `instances_*.json` -> image id (str, as `training.data`'s COCO reader gives it in
    `Sample.image_id`) -> the names of the categories annotated in it. Every image the file lists
    is included, those without any annotation with an empty set."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        present: dict[str, set[str]] = {str(image["id"]): set() for image in data.get("images", [])}
        for ann in data["annotations"]:
            present.setdefault(str(ann["image_id"]), set()).add(names[ann["category_id"]])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a COCO instances file ({error!r} missing)") from error
    return present


# Scenes that captions name as often as objects, which issue #27's object metrics count beside the
# 80 categories: scene -> the words that name it (plurals derived, as for objects).
SCENES: dict[str, tuple[str, ...]] = {
    "food": ("food", "meal", "dish"),
    "kitchen": ("kitchen",),
    "street": ("street", "road"),
    "water": ("water", "ocean", "lake", "river", "sea", "pool"),
    "grass": ("grass", "grassy", "lawn", "field"),
}
_SCENE_WORDS = {form: scene for scene, names in SCENES.items() for name in names for form in (name, _plural(name))}


def mentioned_scenes(caption: str) -> set[str]:
    """The `SCENES` that `caption` names ("two dogs on the lawn" -> {"grass"})."""
    return {_SCENE_WORDS[t] for t in (_normalise(t) for t in tokenize(caption)) if t in _SCENE_WORDS}


def reference_objects(references: list[str], min_refs: int = 3,
                      mentioned: Callable[[str], set[str]] = mentioned_objects) -> tuple[set[str], set[str]]:
    """A photo's reference captions -> (its salient objects, those at least `min_refs` of them name,
    or all of them where it has fewer; every object some reference names). `mentioned`: what a
    caption names (`mentioned_scenes` for scenes)."""
    per_reference = [mentioned(r) for r in references]
    in_references = set().union(*per_reference)
    needed = min(min_refs, len(per_reference))
    return {o for o in in_references if sum(o in r for r in per_reference) >= needed}, in_references

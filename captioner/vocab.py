"""Tokenizer and vocabulary.

Captions are lowercased and split into words; punctuation separates words and is dropped
(the COCO evaluation tokenizer drops it too), so "A dog's ball." -> ["a", "dog's", "ball"].
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id mapping; ids 0..3 are <pad> <bos> <eos> <unk>."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat words")
        self.words = words
        self.index = {word: i for i, word in enumerate(words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids no caption may contain: <pad>, <bos> and <unk> (<eos> ends one)."""
        return (self.pad_id, self.bos_id, self.unk_id)

    def forms(self, word: str) -> list[str]:
        """The word and its singular or plural in this vocabulary (cat -> cat, cats; bus -> bus,
        buses; puppies -> puppies, puppy): what a required word may appear as."""
        word = word.lower()
        candidates = [word, word + "s", word + "es"]
        if word.endswith("y"):
            candidates.append(word[:-1] + "ies")
        if word.endswith("ies"):
            candidates.append(word[:-3] + "y")
        if word.endswith("es"):
            candidates.append(word[:-2])
        if word.endswith("s"):
            candidates.append(word[:-1])
        return [w for w in dict.fromkeys(candidates) if w in self.index and w not in SPECIALS]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = [self.index.get(token, self.unk_id) for token in tokenize(text)]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>; special tokens are never shown."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"words": list(self.words)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        return cls(data["words"])

"""Captions without photos: the decoder learns words and sentences beyond the paired photos.

A text corpus is a CSV `image,caption` (the layout of `../shared/data/text/`; the image column
is ignored) or a plain file with one caption per line. In training, each step adds a batch of
these captions, decoded with the image input absent (one all-zero region), to the photo batch:
the decoder is trained as a language model and as a captioner at once, as in Hendricks et al.'s
DCC and Venugopalan et al.'s NOC, so the words it learns from text stay available to it.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable

import torch

from captioner.vocab import Vocabulary

from .batches import encode_caption, pad_sequences

log = logging.getLogger(__name__)


class TextError(ValueError):
    pass


def read_captions(path: str | Path) -> list[str]:
    """All captions of one text corpus, in file order."""
    path = Path(path)
    if not path.is_file():
        raise TextError(f"no text corpus at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.strip().lower() == "image,caption":
            rows = csv.reader(handle)
            next(rows)
            captions = [",".join(row[1:]).strip() for row in rows if len(row) >= 2]
        else:
            captions = [line.strip() for line in handle]
    captions = [c for c in captions if c]
    if not captions:
        raise TextError(f"{path}: no captions")
    return captions


def read_corpora(paths: Iterable[str | Path]) -> list[str]:
    captions: list[str] = []
    for path in paths:
        found = read_captions(path)
        log.info("text corpus %s: %d captions", path, len(found))
        captions.extend(found)
    return captions


class TextBatches:
    """Random batches of encoded captions; every draw comes from the caller's generator, so a
    resumed run draws the same text batches."""

    def __init__(self, captions: list[str], vocab: Vocabulary, max_tokens: int):
        self.sequences = [encode_caption(vocab, c, max_tokens) for c in captions]
        self.pad_id = vocab.pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """-> tokens (size, T) `<bos> w1 .. wn <eos>`, padded."""
        rows = torch.randint(0, len(self.sequences), (size,), generator=generator).tolist()
        return pad_sequences([self.sequences[r] for r in rows], self.pad_id)


class TextConcepts:
    """Concept confidences for captions without photos (decoders with concept inputs,
    `captioner.decoder`): what the tagger might say of a photo the caption describes.

    A concept word the caption names (any of its forms) gets a confidence drawn uniformly from
    [`low`, 1], but is left out (0) with probability `miss`, as the tagger misses named objects;
    words it does not name get 0. Draws come from the caller's generator, so a resumed run draws
    the same."""

    def __init__(self, vocab: Vocabulary, words: list[str], forms: dict[str, list[str]], *,
                 low: float = 0.3, miss: float = 0.3):
        self.concepts = len(words)  # W
        self.low, self.miss = low, miss
        # word id -> its concept's column, W for words that name no concept
        self.column = torch.full((len(vocab),), len(words), dtype=torch.long)
        for j, word in enumerate(words):
            for form in forms[word]:
                if form in vocab.index:
                    self.column[vocab.index[form]] = j

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """tokens (M, T) -> confidences (M, W)."""
        m = tokens.shape[0]
        named = torch.zeros(m, self.concepts + 1).scatter_(1, self.column[tokens.cpu()], 1.0)[:, :-1]  # (M, W)
        draws = torch.rand(2, m, self.concepts, generator=generator)
        kept = named * (draws[0] >= self.miss)
        return (kept * (self.low + (1 - self.low) * draws[1])).to(tokens.device)

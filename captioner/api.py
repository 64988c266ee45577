"""`Captioner`: the one object that loads a model and captions images.

    from captioner import Captioner
    model = Captioner.default()                      # or Captioner.from_checkpoint("run/best.pt")
    result = model.caption("photo.jpg", num_beams=3, num_return_sequences=3)
    result.text, result.sequences[1].log_prob

The CLI, the folder command, evaluation and the HTTP service all load through `from_checkpoint`,
which also reads ONNX exports (`captioner/runtime/onnxrt.py`) and chooses the inference path once
(`precision="auto"|"fp32"|"bf16"|"int8"`, `captioner/runtime/precision.py`): `model.inference` says which
path runs and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from .checkpoint import CheckpointError, checkpoint_payload, file_sha256, load_checkpoint, write_checkpoint
from .decoder import GATES, Decoder, DecoderConfig
from .decoding import MAX_CONSTRAINTS, DecodeConfig, Hypothesis, generate
from .encoder import Encoder, EncoderConfig
from .images import DEFAULT_MAX_PIXELS, ImageSource
from .preprocessing import Preprocessing
from .runtime import cpu, onnx_export, onnxrt
from .runtime.precision import EagerEncoder, InferencePath, check_precision, choose_path
from .tagger import Tagger
from .vocab import Vocabulary

DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "default.pt"


@dataclass
class Caption:
    """One generated sentence. `attention` is (T, H', W'), one map per word (then <eos>);
    `hidden_states` (asked for with output_hidden_states): the LSTM's top-layer state from which
    each word (then <eos>) was chosen, "h" and "c" (T, D), and on PyTorch "gates" (T, 4, D)."""

    text: str
    words: list[str]
    log_prob: float
    score: float
    token_log_probs: list[float]
    finished: bool
    attention: torch.Tensor | None = field(default=None, repr=False)
    hidden_states: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self, *, attention: bool = False) -> dict[str, Any]:
        """JSON-ready; with `attention`, the (T, H', W') grids as nested lists and their shape.
        Log-probabilities and scores are rounded to 6 places: a batch of other images changes
        the last float digits, and a resumed caption-folder run must write the same bytes."""
        data = {"text": self.text, "words": self.words, "log_prob": round(self.log_prob, 6),
                "score": round(self.score, 6), "token_log_probs": [round(v, 6) for v in self.token_log_probs],
                "finished": self.finished}
        if attention and self.attention is not None:
            grid = self.attention.float()  # (T, H', W')
            data["attention"] = [[[round(v, 4) for v in row] for row in word] for word in grid.tolist()]
            data["attention_shape"] = list(grid.shape)
        if self.hidden_states is not None:
            data["hidden_states"] = _hidden_states_json(self.hidden_states)
        return data


def _hidden_states_json(states: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{"h", "c": (T, D) lists, "gates": {"i", "f", "g", "o": (T, D) lists}} rounded to 4 places."""
    rounded = lambda t: [[round(v, 4) for v in row] for row in t.float().tolist()]  # noqa: E731
    data: dict[str, Any] = {name: rounded(states[name]) for name in ("h", "c") if name in states}
    if "gates" in states:
        data["gates"] = {gate: rounded(states["gates"][:, i]) for i, gate in enumerate(GATES)}
    return data


@dataclass
class Requirement:
    """A word the captions had to say (or, `excluded`, must not say), and why: `source` is
    "request" (force_words) or "tag" (the model's tagger, with calibrated `confidence`: high for a
    required tag, near zero for an excluded one)."""

    word: str
    forms: list[str]
    source: str
    confidence: float | None = None
    classes: list[str] = field(default_factory=list)  # for tags: the ImageNet classes behind it
    excluded: bool = False

    def ids(self, vocabulary: Vocabulary) -> list[int]:
        return [vocabulary.index[w] for w in self.forms]

    def to_dict(self, caption: Caption | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"word": self.word, "forms": self.forms, "source": self.source}
        if self.confidence is not None:
            data["confidence"] = round(self.confidence, 4)
        if self.classes:
            data["classes"] = self.classes
        if caption is not None:
            data["satisfied"] = any(w in caption.words for w in self.forms) != self.excluded
        return data


@dataclass
class CaptionResult:
    """The n-best captions of one image, best first, and the words they were required to say."""

    sequences: list[Caption]
    required: list[Requirement] = field(default_factory=list)
    excluded: list[Requirement] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.sequences[0].text

    @property
    def score(self) -> float:
        return self.sequences[0].score

    @property
    def attention(self) -> torch.Tensor | None:
        return self.sequences[0].attention

    def requirements(self) -> dict[str, list[dict[str, Any]]]:
        """The required and excluded words, each with whether the top caption obeyed it."""
        return {"required": [r.to_dict(self.sequences[0]) for r in self.required],
                "excluded": [r.to_dict(self.sequences[0]) for r in self.excluded]}

    def to_dict(self, *, attention: bool = False) -> dict[str, Any]:
        """The one JSON shape of a result, for `captioner caption --json`, the HTTP API and
        caption-folder records: `{"caption", "score", "sequences": [Caption.to_dict()],
        "required", "excluded"}`."""
        return {"caption": self.text, "score": round(self.score, 6),
                "sequences": [s.to_dict(attention=attention) for s in self.sequences], **self.requirements()}


class Captioner:
    """A model ready to caption. Built from PyTorch modules (a `precision` picks the encoder's
    path, see `captioner/runtime/precision.py`), or by `from_checkpoint` from a .pt checkpoint or an ONNX
    export. `inference` records the path that runs and why."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        vocabulary: Vocabulary,
        preprocessing: Preprocessing,
        *,
        provenance: dict[str, Any] | None = None,
        tagger: Tagger | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ):
        check_precision(precision)
        self._setup(decoder.config, vocabulary, preprocessing, provenance, tagger, device)
        self.encoder = encoder.to(self.device).eval()
        self.encoder.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN)
        self.decoder = decoder.to(self.device).eval()
        self.inference = choose_path(precision, device=self.device, runtime="pytorch",
                                     backbone=encoder.config.backbone, int8_unavailable=self._int8_unavailable)
        # The decoder's products follow the path: its quality is measured with them (evaluate_paths).
        self.decoder.products = self.inference.precision if self.device.type == "cpu" else "fp32"
        if self.tagger is not None:  # its guidance is measured with the path's products too
            self.tagger.products = self.decoder.products
        if self.inference.precision == "int8":
            self._encode = onnx_export.int8_encoder(self, self._int8_calibration())
        else:
            dtype = torch.bfloat16 if self.inference.precision == "bf16" else None
            self._encode = EagerEncoder(self.encoder, preprocessing, self.device, dtype)

    def _setup(self, decoder_config: DecoderConfig, vocabulary: Vocabulary, preprocessing: Preprocessing,
               provenance: dict[str, Any] | None, tagger: Tagger | None, device: str | torch.device) -> None:
        if decoder_config.vocab_size != len(vocabulary):
            raise ValueError(f"decoder has {decoder_config.vocab_size} words, vocabulary {len(vocabulary)}")
        self.device = torch.device(device)
        self.vocabulary = vocabulary
        self.preprocessing = preprocessing
        self.provenance = provenance or {}
        self.tagger = None if tagger is None else tagger.to(self.device)
        self.checkpoint_sha256: str | None = None

    def _int8_calibration(self) -> dict | None:
        if not hasattr(self, "_calibration"):
            self._calibration = onnx_export.bundled_calibration(self)
        return self._calibration

    def _int8_unavailable(self) -> str | None:
        problem = onnxrt.available()
        if problem is None and self._int8_calibration() is None:
            problem = ("no int8 calibration for this encoder: run training/calibrate_int8.py and export with "
                       "`captioner export CHECKPOINT OUT.onnx --format onnx --int8-calibration FILE`")
        return problem

    # -- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", *,
                        precision: str = "auto") -> "Captioner":
        """Load a .pt checkpoint or an ONNX export (OUT.onnx of `captioner export --format onnx`,
        run with ONNX Runtime). `precision`: "auto" (the fastest path this CPU runs natively whose
        quality was measured to hold), "fp32", "bf16" or "int8"; `model.inference` says which runs
        and why."""
        check_precision(precision)
        if onnxrt.is_onnx(path):
            return cls._from_onnx(path, device, precision)
        payload = load_checkpoint(path)
        try:
            encoder_config = EncoderConfig.from_dict({**payload["encoder"], "pretrained": False, "weights_path": None})
            preprocessing = Preprocessing.from_dict(payload["preprocessing"])
            encoder = Encoder(encoder_config, image_size=preprocessing.size)
            decoder = Decoder(DecoderConfig.from_dict(payload["decoder"]))
            vocabulary = Vocabulary.from_dict(payload["vocabulary"])
            state = payload["state_dict"]
            encoder.load_state_dict(_prefixed(state, "encoder."), strict=True)
            decoder.load_state_dict(_prefixed(state, "decoder."), strict=True)
            tagger = Tagger.from_dict(payload["tagger"]) if payload.get("tagger") else None
        except (TypeError, KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path}: checkpoint does not describe a valid model ({error})") from error
        model = cls(encoder, decoder, vocabulary, preprocessing, provenance=payload.get("provenance"),
                    tagger=tagger, device=device, precision=precision)
        model.checkpoint_sha256 = file_sha256(path)
        return model

    @classmethod
    def _from_onnx(cls, path: str | os.PathLike, device: str | torch.device, precision: str) -> "Captioner":
        """An ONNX export: the encoder and the decoder's step on ONNX Runtime, decoding in Python."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file")
        if torch.device(device).type != "cpu":
            raise ValueError(f"{path}: ONNX models run on the CPU with ONNX Runtime, not on {device}")
        try:
            meta, graph = onnxrt.read_metadata(path)
            info = meta["captioner"]
            encoder_config = EncoderConfig.from_dict(info["encoder"])
            decoder_config = DecoderConfig.from_dict(info["decoder"])
            vocabulary = Vocabulary(meta["vocabulary"])
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            tagger = None
            if meta.get("tagger"):
                weight, bias = onnxrt.tagger_weights(graph)
                tagger = Tagger.from_dict({**meta["tagger"], "weight": weight, "bias": bias})
        except (TypeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: not a usable captioner ONNX model ({error})") from error
        files = {kind: path.with_name(name) for kind, name in info["files"].items()}
        missing = [str(f) for kind, f in files.items() if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: the export's other files are missing: {', '.join(missing)}")
        # 8-bit weights where the CPU has int8 dot products, 7-bit ones where they would saturate
        # (see captioner.runtime.onnxrt); an export from before the 7-bit file has only the first.
        int8_file = files.get("encoder_int8")
        if not cpu.native_int8():
            int8_file = files.get("encoder_int8_7bit", int8_file)
        inference = choose_path(precision, device=torch.device("cpu"), runtime="onnxruntime",
                                backbone=encoder_config.backbone,
                                int8_unavailable=lambda: None if int8_file else
                                "this export has no int8 encoder (no calibration for its encoder when it was exported)")
        model = cls.__new__(cls)
        model._setup(decoder_config, vocabulary, preprocessing, provenance=info.get("provenance"), tagger=tagger,
                     device="cpu")
        encoder_file = int8_file if inference.precision == "int8" else path
        model.encoder = onnxrt.OrtEncoder(onnxrt.LazySession(encoder_file), encoder_config, info["grid_size"],
                                          info["feature_dim"], parameters=info.get("parameters", 0))
        model.decoder = onnxrt.OrtDecoder(decoder_config, onnxrt.LazySession(files["decoder_init"]),
                                          onnxrt.LazySession(files["decoder_step"]))
        model.inference = InferencePath(inference.precision, "onnxruntime", inference.requested, inference.reason)
        model._encode = model.encoder
        model.checkpoint_sha256 = file_sha256(path)
        return model

    @classmethod
    def default(cls, device: str | torch.device = "cpu", *, precision: str = "auto") -> "Captioner":
        """The model bundled with the package (see MODEL_CARD.md)."""
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the bundled model {DEFAULT_CHECKPOINT} is missing; reinstall captioner or pass a checkpoint"
            )
        return cls.from_checkpoint(DEFAULT_CHECKPOINT, device=device, precision=precision)

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything `from_checkpoint` needs (`captioner.checkpoint.checkpoint_payload`)."""
        return checkpoint_payload(*self._parts(), provenance=self.provenance, tagger=self.tagger)

    def save(self, path: str | os.PathLike, *, half: bool = False) -> None:
        write_checkpoint(path, *self._parts(), provenance=self.provenance, tagger=self.tagger, half=half)

    def _parts(self) -> tuple:
        if not isinstance(self.encoder, nn.Module):
            raise ValueError("an ONNX model cannot be saved as a checkpoint: save or export the .pt it came from")
        return self.encoder, self.decoder, self.vocabulary, self.preprocessing

    # -- captioning ------------------------------------------------------------------------------

    def load_pixels(self, image: ImageSource | torch.Tensor, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """One image (path, bytes, PIL image, or (3, H, W) tensor) -> (3, S, S) uint8."""
        if isinstance(image, torch.Tensor):
            return self.preprocessing.from_tensor(image)
        return self.preprocessing.load(image, max_pixels=max_pixels)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) uint8 -> regions (B, P, E), pooled (B, E), in fp32 on every path."""
        return self._encode(pixels)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, config: DecodeConfig | None = None) -> list[CaptionResult]:
        """(B, 3, S, S) uint8 preprocessed images -> one result per image."""
        regions, pooled = self.encode(pixels)
        return self.caption_features(regions, pooled, config)

    @torch.inference_mode()
    def caption_features(self, regions: torch.Tensor, pooled: torch.Tensor,
                         config: DecodeConfig | None = None) -> list[CaptionResult]:
        """Encoded images, regions (B, P, E) and pooled (B, E) -> one result per image, with the
        words each had to say: `force_words`, then (with `tags`) the tagger's confident words; and
        (with `tags`) the words the tagger is sure the photo does not show, which it must not say."""
        config = config or DecodeConfig()
        v = self.vocabulary
        requested = self.requested_words(config)
        required = [list(requested) for _ in range(pooled.shape[0])]
        excluded: list[list[Requirement]] = [[] for _ in required]
        if config.guided_by_tags and self.tagger is not None:
            tags, absent = self.tagger.guide(pooled, vocabulary=v)
            for words, image_tags, banned, image_absent in zip(required, tags, excluded, absent):
                taken = {form for r in words for form in r.forms}
                for tag in image_tags:
                    if len(words) < MAX_CONSTRAINTS and not taken.intersection(tag.forms):
                        words.append(Requirement(tag.word, list(tag.forms), "tag", tag.confidence, list(tag.classes)))
                        taken.update(tag.forms)
                banned.extend(Requirement(t.word, list(t.forms), "tag", t.confidence, excluded=True)
                              for t in image_absent if not taken.intersection(t.forms))
        constraints = [[r.ids(v) for r in words] for words in required] if any(required) else None
        bans = [[i for r in words for i in r.ids(v)] for words in excluded] if any(excluded) else None
        hypotheses = generate(self.decoder, regions, pooled, config, bos_id=v.bos_id, eos_id=v.eos_id,
                              banned_ids=v.never_generated, constraints=constraints, excluded=bans)
        return [CaptionResult([self._caption(h) for h in hyps], words, banned)
                for hyps, words, banned in zip(hypotheses, required, excluded)]

    def requested_words(self, config: DecodeConfig) -> list[Requirement]:
        """`force_words` with their forms in this model's vocabulary; ValueError for a word it
        does not know (it could never say it)."""
        required = []
        for word in config.force_words:
            forms = self.vocabulary.forms(word)
            if not forms:
                raise ValueError(f"force_words: {word!r} is not in this model's vocabulary of "
                                 f"{len(self.vocabulary)} words, so no caption can say it")
            required.append(Requirement(word, forms, "request"))
        return required

    def caption(
        self,
        images: ImageSource | torch.Tensor | Sequence[ImageSource | torch.Tensor],
        *,
        batch_size: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **decode_options: Any,
    ) -> CaptionResult | list[CaptionResult]:
        """Caption one image or a list of them (paths, bytes, PIL images, (3, H, W) tensors, or a
        (B, 3, H, W) tensor). Decoding options are those of `DecodeConfig` (Hugging Face names).
        One image gives one `CaptionResult`; a list or batch tensor gives a list."""
        config = DecodeConfig.from_kwargs(**decode_options)
        self.requested_words(config)  # an unknown word fails before any image is read
        single = not _is_batch(images)
        items = [images] if single else list(images)
        results: list[CaptionResult] = []
        for start in range(0, len(items), batch_size):
            pixels = torch.stack([self.load_pixels(x, max_pixels=max_pixels) for x in items[start:start + batch_size]])
            results.extend(self.caption_pixels(pixels, config))
        return results[0] if single else results

    def _caption(self, hypothesis: Hypothesis) -> Caption:
        words = [self.vocabulary.words[i] for i in hypothesis.tokens]
        attention = None
        if hypothesis.attention is not None:
            attention = hypothesis.attention.view(-1, *self.encoder.grid_size)  # (T, H', W')
        return Caption(" ".join(words), words, hypothesis.log_prob, hypothesis.score,
                       hypothesis.token_log_probs, hypothesis.finished, attention, hypothesis.hidden_states)

    def describe(self) -> dict[str, Any]:
        """What `captioner info` and the service's /v1/model report."""
        return {
            "backbone": self.encoder.config.backbone,
            "attention": self.decoder.config.attention,
            "cell": self.decoder.config.cell,
            "num_layers": self.decoder.config.num_layers,
            "hidden_dim": self.decoder.config.hidden_dim,
            "vocabulary_size": len(self.vocabulary),
            "feature_grid": list(self.encoder.grid_size),
            "preprocessing": self.preprocessing.to_dict(),
            "parameters": sum(_parameters(part) for part in (self.encoder, self.decoder)),
            "tagger": None if self.tagger is None else self.tagger.describe(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "decoder_step": self.decoder.step_runtime,
            "inference": self.inference.to_dict(),
            "provenance": self.provenance,
        }


def _parameters(part: Any) -> int:
    if isinstance(part, nn.Module):
        return sum(p.numel() for p in part.parameters())
    return part.parameter_count


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_batch(images: object) -> bool:
    if isinstance(images, torch.Tensor):
        return images.ndim == 4
    return isinstance(images, Iterable) and not isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image))



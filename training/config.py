"""Training configuration: dataclass defaults, then a YAML file, then dotted command-line
overrides (`--optim.lr=3e-4 --model.decoder.attention=false`). The resolved config is written
into the run folder and into every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from captioner.decoder import DecoderConfig
from captioner.decoding import DecodeConfig
from captioner.encoder import EncoderConfig

from .data import DataSpec


# DecoderConfig's fields that the data and the encoder decide: the vocabulary, the feature width,
# and the tagger's words, classes and activation behind `concepts`.
FROM_DATA = ("vocab_size", "feature_dim", "concepts", "concept_classes", "concept_activation")


def _decoder_settings() -> type:
    """`model.decoder`: `DecoderConfig`'s own fields and defaults (made from it, so they are
    written once) minus FROM_DATA, plus `concepts: bool`: the encoder's ImageNet head, mapped to
    caption words and calibrated (captioner.tagger), as an input; captions without photos get
    confidences made from their own words. With model.init_from a model without them, adds them
    (starting at zero: the model as it was). `concept_tagger`: a tagger file (python -m
    training.concepts) whose word detectors give the concepts instead of the ImageNet head."""
    hints = get_type_hints(DecoderConfig)
    own = [(f.name, hints[f.name], field(default=f.default)) for f in fields(DecoderConfig) if f.name not in FROM_DATA]
    settings = make_dataclass("DecoderSettings", [*own, ("concepts", bool, field(default=False)),
                                                  ("concept_tagger", str | None, field(default=None))])
    settings.__module__, settings.__doc__ = __name__, _decoder_settings.__doc__
    return settings


DecoderSettings = _decoder_settings()


@dataclass
class ModelSettings:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderSettings = field(default_factory=DecoderSettings)
    resize: str = "squash"  # how images become square: "squash" (whole scene) or "crop"
    min_word_count: int = 5
    max_caption_tokens: int = 24  # longer training captions are truncated
    # Start from this checkpoint's weights (fine-tuning): its vocabulary, architecture and
    # preprocessing replace the settings above; optimiser and schedule start afresh.
    init_from: str | None = None


@dataclass
class DataSettings:
    # One data set or a list of them (a single mapping reads as a list of one); each has its own
    # feature cache. Training sets are weighed per epoch by their `weight`; each validation set is
    # decoded and reported, and the model is selected on the `weight`-weighted mean of their
    # CIDEr-D (`val_CIDEr-D` in the run's metrics).
    train: list[DataSpec] = field(default_factory=lambda: [DataSpec(format="flickr", path="../shared/data/flickr8k")])
    val: list[DataSpec] = field(default_factory=lambda: [DataSpec(format="flickr", path="../shared/data/flickr8k")])
    train_split: str = "train"
    val_split: str = "dev"
    captions_per_image: int = 5  # sequences per image in a batch; the image is encoded once
    cache_dir: str = "cache/features"
    use_cache: bool = True  # frozen encoder: encode each image once; false runs the encoder every step
    # Cached views of each training image: the plain one and cache_views - 1 light augmentations
    # (crop, brightness, contrast); each batch takes a random view. Costs one encoding pass per view.
    cache_views: int = 1
    # Captions without photos (CSV image,caption or one per line): their words join the vocabulary,
    # and every step adds optim.text_batch of them as language-model training (image input absent).
    text: list[str] = field(default_factory=list)
    workers: int = 2

    def __post_init__(self) -> None:
        if self.cache_views < 1:
            raise ValueError(f"data.cache_views must be at least 1, not {self.cache_views}")
        for role, specs in (("train", self.train), ("val", self.val)):
            names = [spec.label for spec in specs]
            if not specs or len(set(names)) < len(names):
                raise ValueError(f"data.{role} needs at least one data set, with distinct names: {names}")
        if not sum(spec.weight for spec in self.val) > 0:
            raise ValueError("data.val: the validation weights must not all be 0")


@dataclass
class OptimSettings:
    epochs: int = 30
    batch_images: int = 32  # images per step (x captions_per_image sequences)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    schedule: str = "cosine"  # "cosine" or "constant"
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    accumulation: int = 1
    label_smoothing: float = 0.0
    attention_reg: float = 1.0  # doubly stochastic attention: lambda * sum_p (1 - sum_t alpha)^2
    scheduled_sampling: float = 0.0  # max probability of feeding the model's own word
    encoder_lr: float = 1e-4  # when fine-tuning encoder stages
    finetune_from_epoch: int = -1  # >= 0: unfreeze model.encoder.trainable_stages from that epoch
    objective: str = "xe"  # "xe": teacher-forced cross-entropy; "scst": self-critical CIDEr-D
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the others' mean
    scst_object_weight: float = 0.0  # reward += w * share of the salient objects named
    scst_object_penalty: float | None = None  # reward -= this * objects named that no reference names (None: w)
    scst_scene_penalty: float = 0.0  # reward -= this * scenes (food, kitchen, street, water, grass) named that no reference names
    text_batch: int = 80  # captions without photos per step (with data.text)
    text_weight: float = 0.5  # weight of their language-model cross-entropy in the loss


@dataclass
class EvalSettings:
    every_epochs: int = 1
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(num_beams=3))
    max_images: int | None = None  # None: the whole validation split
    patience: int = 5  # epochs without a better CIDEr before stopping; 0 disables
    meteor: bool = True  # needs Java


@dataclass
class RunSettings:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with bf16 instructions (AVX-512 BF16, AMX)
    compile: bool = False  # torch.compile the model on CUDA (cross-entropy; captions padded to one length)
    compile_elementwise: bool = False  # CPU: torch.compile the LSTM cell's elementwise work (a few seconds per batch shape)
    checkpoint_every_steps: int = 200
    time_budget_minutes: float | None = None
    progress: bool = True
    threads: int | None = None


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping")
        data = loaded
    for override in overrides:
        key, sep, raw = override.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {override!r} must look like --section.key=value")
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        if isinstance(target, list):
            target[int(leaf)] = yaml.safe_load(raw)
        else:
            target[leaf] = yaml.safe_load(raw)
    return _build(TrainConfig, data, "")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "")


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        default = getattr(cls(), f.name) if _constructible(cls) else None
        if dataclasses.is_dataclass(hint):
            merged = {**(asdict(default) if default is not None else {}), **(value or {})}
            values[f.name] = _build(hint, merged, f"{where}{f.name}.")
        elif _dataclass_list(hint):
            item = hint.__args__[0]
            if isinstance(value, dict):  # one data set given as a mapping: a list of one
                base = asdict(default[0]) if default and len(default) == 1 else {}
                value = [{**base, **value}]
            if not isinstance(value, list):
                raise ValueError(f"{where}{f.name}: expected a mapping or a list of mappings")
            values[f.name] = [_build(item, entry, f"{where}{f.name}.{i}.") for i, entry in enumerate(value)]
        else:
            values[f.name] = _coerce(value, hint, where + f.name)
    return cls(**values)


def _dataclass_list(hint: Any) -> bool:
    args = getattr(hint, "__args__", ())
    return getattr(hint, "__origin__", None) is list and len(args) == 1 and dataclasses.is_dataclass(args[0])


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """YAML reads `3e-4` as a string; numbers given where numbers belong are converted."""
    options = getattr(hint, "__args__", (hint,))
    if isinstance(value, str):
        for kind in (int, float):
            if kind in options:
                try:
                    return kind(value)
                except ValueError:
                    continue
        if str not in options:
            raise ValueError(f"{name}: expected {hint}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
        return float(value)
    return value


def _constructible(cls) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False

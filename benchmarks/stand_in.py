"""A stand-in for the bundled model when it is absent: the default architecture (the decoder
settings of training/configs/flickr8k.yaml, a 2,604-word vocabulary) with random decoder
weights. Decoding speed depends on the architecture and caption lengths, not on the weights;
random weights make captions run to max_new_tokens, so the stand-in is pessimistic."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def default_size_checkpoint(path: Path) -> Path:
    from captioner.api import Captioner
    from captioner.decoder import Decoder, DecoderConfig
    from captioner.encoder import Encoder, EncoderConfig
    from captioner.preprocessing import Preprocessing
    from captioner.vocab import SPECIALS, Vocabulary

    settings = yaml.safe_load((ROOT / "training" / "configs" / "flickr8k.yaml").read_text())["model"]
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(backbone=settings["encoder"]["backbone"]))
    vocabulary = Vocabulary([*SPECIALS, *[f"word{i}" for i in range(2600)]])
    decoder = Decoder(DecoderConfig(vocab_size=len(vocabulary), feature_dim=encoder.feature_dim,
                                    **settings["decoder"]))
    model = Captioner(encoder, decoder, vocabulary, Preprocessing(size=224, resize=settings["resize"]),
                      provenance={"note": "benchmark: default architecture, random decoder"})
    model.save(path)
    return path

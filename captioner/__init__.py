"""captioner: image captioning with a pretrained CNN encoder and an LSTM decoder with attention."""

from .api import Caption, CaptionResult, Captioner
from .decoder import Decoder, DecoderConfig
from .decoding import DecodeConfig
from .encoder import Encoder, EncoderConfig
from .images import ImageError
from .preprocessing import Preprocessing
from .vocab import Vocabulary

__all__ = [
    "Caption", "CaptionResult", "Captioner", "Decoder", "DecoderConfig", "DecodeConfig",
    "Encoder", "EncoderConfig", "ImageError", "Preprocessing", "Vocabulary",
]
__version__ = "0.1.0"

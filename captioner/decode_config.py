"""How to decode: `DecodeConfig`, the options of greedy, sampling and beam search, with their
bounds. Parameter names follow Hugging Face's `GenerationConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .vocab import tokenize

MAX_CONSTRAINTS = 3  # required words per image: the search keeps 2^C states of K beams


@dataclass
class DecodeConfig:
    num_beams: int = 3
    num_return_sequences: int = 1
    max_new_tokens: int = 20  # words, not counting <eos>
    min_new_tokens: int = 1
    length_penalty: float = 1.0  # score = log_prob / length ** length_penalty; 0 ranks by log_prob
    no_repeat_ngram_size: int = 3  # 0 disables
    early_stopping: bool = True  # beam search: stop an image at num_beams finished hypotheses
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None
    return_attention: bool = False
    force_words: tuple[str, ...] = ()  # words every caption must say (any form of each: cat or cats)
    tags: bool = True  # also require the model's confident visual tags (models that carry a tagger)

    LIMITS = {"num_beams": (1, 16), "num_return_sequences": (1, 16), "max_new_tokens": (1, 100),
              "min_new_tokens": (0, 100), "no_repeat_ngram_size": (0, 10), "top_k": (0, 100_000)}

    def __post_init__(self) -> None:
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature <= 100:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping must be true or false, got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)) or not -5 <= self.length_penalty <= 5:
            raise ValueError(f"length_penalty must be in [-5, 5], got {self.length_penalty!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.tags, bool):
            raise ValueError(f"tags must be true or false, got {self.tags!r}")
        self.force_words = _words(self.force_words)
        if self.force_words and self.do_sample:
            raise ValueError("force_words needs search: it does not combine with do_sample=True")
        if self.do_sample:
            if self.num_beams != 1:
                raise ValueError("sampling draws independent sequences: use num_beams=1 with do_sample=True")
        elif self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences must not exceed num_beams (or use do_sample=True)")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "DecodeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown decoding option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def _words(value) -> tuple[str, ...]:
    """force_words as given (a list, or a comma-separated string) -> distinct lowercase words."""
    if isinstance(value, str):
        value = [w for w in value.split(",") if w.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"force_words must be a list of words, got {value!r}")
    words = tuple(dict.fromkeys(w.strip().lower() for w in value))
    if len(words) > MAX_CONSTRAINTS:
        raise ValueError(f"force_words takes at most {MAX_CONSTRAINTS} words, got {len(words)}")
    for word in words:
        if len(word) > 40 or tokenize(word) != [word]:
            raise ValueError(f"force_words: {word!r} is not a single word")
    return words

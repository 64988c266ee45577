"""How to decode: `DecodeConfig`, the options of greedy, sampling and beam search. Parameter names
follow Hugging Face's `GenerationConfig`.

Each option is described once, in its field's metadata: `help`, and for numbers `minimum`,
`maximum` and whether the minimum is exclusive. Validation (`__post_init__`), the command-line
flags (`captioner.arguments`), the HTTP parser and the OpenAPI document (`service/`) all read it,
so an option's bounds and wording cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from .vocab import tokenize

MAX_CONSTRAINTS = 3  # required words per image (force_words and tags together)


def _option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
            exclusive_minimum: bool = False) -> Any:
    return dataclasses.field(default=default, metadata={
        "help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum})


@dataclass
class DecodeConfig:
    num_beams: int = _option(3, "beam width; 1 is greedy (or sampling with do_sample)", minimum=1, maximum=16)
    num_return_sequences: int = _option(
        1, "how many captions per image (n-best list), best first; at most num_beams unless sampling",
        minimum=1, maximum=16)
    max_new_tokens: int = _option(20, "at most this many words per caption, not counting <eos>", minimum=1, maximum=100)
    min_new_tokens: int = _option(1, "at least this many words before the caption may end", minimum=0, maximum=100)
    length_penalty: float = _option(1.0, "score = log_prob / length ** length_penalty; 0 ranks by log_prob",
                                    minimum=-5, maximum=5)
    no_repeat_ngram_size: int = _option(3, "never repeat an n-gram of this size; 0 disables", minimum=0, maximum=10)
    early_stopping: bool = _option(True, "beam search: stop an image at num_beams finished captions")
    do_sample: bool = _option(False, "sample instead of beam search (requires num_beams=1)")
    temperature: float = _option(1.0, "sampling temperature", minimum=0, maximum=100, exclusive_minimum=True)
    top_k: int = _option(0, "sample from the k most likely words; 0 disables", minimum=0, maximum=100_000)
    top_p: float = _option(1.0, "nucleus sampling threshold", minimum=0, maximum=1, exclusive_minimum=True)
    seed: int | None = _option(None, "random seed for reproducible sampling", minimum=0, maximum=2**63 - 1)
    return_attention: bool = _option(False, "include each word's attention grid (T, H', W') in the result")
    force_words: tuple[str, ...] = _option(
        (), f"words every caption must say, comma-separated, at most {MAX_CONSTRAINTS} (any form of each: cat "
            "or cats); the result's `required` says which words were required and why")
    tags: bool | None = _option(
        None, "also require the model's confident visual tags and exclude the words it is sure are absent (models "
              "that carry a tagger); default: on with search, off with do_sample, which cannot guarantee words "
              "(tags=true with do_sample is refused, as force_words is)")
    output_hidden_states: bool = _option(
        False, "include the LSTM's top-layer state for each word: hidden h and memory cell c (T, D), and on "
               "PyTorch the gates i, f, g, o (T, 4, D)")

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None or field.default is not None:
                _check(field, value)
        self.force_words = _words(self.force_words)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if self.force_words and self.do_sample:
            raise ValueError("force_words needs search: it does not combine with do_sample=True")
        if self.tags and self.do_sample:
            raise ValueError("tags need search: they do not combine with do_sample=True (leave tags unset)")
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

    @property
    def guided_by_tags(self) -> bool:
        """Whether the model's tags guide this decoding: `tags`, or by default whether it searches."""
        return (not self.do_sample) if self.tags is None else self.tags

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def _kinds() -> dict[str, type]:
    """Each option's kind: bool, int, float, or tuple (force_words); `int | None` is int."""
    kinds = {}
    for name, hint in get_type_hints(DecodeConfig).items():
        options = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
        kinds[name] = tuple if getattr(hint, "__origin__", None) is tuple else options[0]
    return kinds


def option_kind(field: dataclasses.Field) -> type:
    return _kinds()[field.name]


def option_range(field: dataclasses.Field) -> str | None:
    """A number option's bounds as an interval, "[1, 16]" or "(0, 1]"; None for the others."""
    low, high = field.metadata["minimum"], field.metadata["maximum"]
    if low is None:
        return None
    return f"{'(' if field.metadata['exclusive_minimum'] else '['}{low}, {high}]"


def _check(field: dataclasses.Field, value: Any) -> None:
    kind, name = option_kind(field), field.name
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif kind in (int, float):
        number = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
        low, high = field.metadata["minimum"], field.metadata["maximum"]
        if not (number and (low < value if field.metadata["exclusive_minimum"] else low <= value) and value <= high):
            what = "an integer in" if kind is int else "in"
            raise ValueError(f"{name} must be {what} {option_range(field)}, got {value!r}")


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

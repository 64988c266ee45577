"""Each decoding option is described once, in `DecodeConfig`'s field metadata: validation and the
command-line flags read the same help and bounds (the HTTP side: tests/service/test_api.py)."""

import argparse
import dataclasses

import pytest

from captioner.arguments import add_decode_arguments
from captioner.decode_config import DecodeConfig, option_kind, option_range

NUMBERS = [f for f in dataclasses.fields(DecodeConfig) if option_kind(f) in (int, float)]


def edges(field: dataclasses.Field) -> tuple[list, list]:
    """Values on the bounds (accepted) and just past them (refused)."""
    low, high, step = field.metadata["minimum"], field.metadata["maximum"], 1 if option_kind(field) is int else 1e-6
    inside = [high] if field.metadata["exclusive_minimum"] else [low, high]
    return inside, [low if field.metadata["exclusive_minimum"] else low - step, high + step]


def valid(**options) -> dict:
    """Options that only test the one given (sampling where a sampling option is set)."""
    base = {"num_beams": 16} if "num_return_sequences" in options else {}
    if {"temperature", "top_k", "top_p", "seed"} & set(options):
        base = {"do_sample": True, "num_beams": 1}
    if "min_new_tokens" in options:
        base = {"max_new_tokens": 100}
    return {**base, **options}


@pytest.mark.parametrize("field", NUMBERS, ids=lambda f: f.name)
def test_every_number_option_is_checked_against_its_own_bounds(field):
    inside, outside = edges(field)
    for value in inside:
        assert getattr(DecodeConfig(**valid(**{field.name: value})), field.name) == value
    for value in [*outside, "3", True]:
        with pytest.raises(ValueError, match=rf"{field.name} must be .*{option_range(field)}".replace("[", r"\[")
                           .replace("(", r"\(").replace("]", r"\]")):
            DecodeConfig(**valid(**{field.name: value}))


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(DecodeConfig) if option_kind(f) is bool],
                         ids=lambda f: f.name)
def test_switches_take_only_true_or_false(field):
    with pytest.raises(ValueError, match=f"{field.name} must be true or false"):
        DecodeConfig(**{field.name: 1})


def test_every_flag_shows_its_options_help_and_bounds():
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    flags = {a.dest: a.help for a in parser._actions if a.dest in DecodeConfig.__dataclass_fields__}
    assert flags.keys() == DecodeConfig.__dataclass_fields__.keys()
    for field in dataclasses.fields(DecodeConfig):
        assert flags[field.name].replace("%%", "%").startswith(field.metadata["help"])
        assert (option_range(field) or "default") in flags[field.name]
    assert "([1, 16]; default: 3)" in flags["num_beams"] and "((0, 1]; default: 1.0)" in flags["top_p"]

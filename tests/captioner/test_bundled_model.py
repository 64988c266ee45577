"""What the README and the model card promise of the bundled model on the example photos: the cat
is a cat, the coffee is coffee, and nobody is invented."""

import pytest

from captioner.api import Captioner
from tests.conftest import EXAMPLES

PERSON_WORDS = {"man", "men", "woman", "women", "person", "people", "child", "children", "boy", "boys",
                "girl", "girls", "kid", "kids", "baby", "lady", "guy", "player", "someone"}


@pytest.mark.parametrize("precision", ["fp32", pytest.param("auto", marks=pytest.mark.integration)])
def test_the_example_photos_are_captioned_as_a_person_would(precision):
    # `auto` may build the int8 encoder on first use (about 15 s), hence integration
    model = Captioner.default(precision=precision)
    cat, coffee = (model.caption(EXAMPLES / name).sequences[0].words for name in ("chelsea.jpg", "coffee.jpg"))
    assert "cat" in cat and not PERSON_WORDS & set(cat), cat
    assert {"coffee", "cup", "mug"} & set(coffee) and not PERSON_WORDS & set(coffee), coffee

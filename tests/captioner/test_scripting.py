import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from captioner.scripting import scripted
from tests.conftest import needs_torchscript


@needs_torchscript
def test_threads_calling_first_get_one_compiled_function_and_keep_their_warning_filters():
    """The service's threads may decode their first caption together: one compile, and no
    thread left with another's temporary filter that hides every warning."""
    def doubled(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    filters = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda _: scripted(doubled), range(16)))
    assert isinstance(compiled[0], torch.jit.ScriptFunction)
    assert all(c is compiled[0] for c in compiled)
    assert warnings.filters == filters
    assert torch.equal(compiled[0](torch.ones(2)), torch.full((2,), 2.0))


@needs_torchscript  # with TorchScript off nothing is compiled, so nothing fails to compile
def test_a_function_torchscript_cannot_compile_runs_as_python(caplog):
    def joined(words: list) -> str:  # an untyped list: TorchScript refuses it
        return " ".join(str(w) for w in words)

    with caplog.at_level("WARNING", logger="captioner.scripting"):
        assert scripted(joined) is joined
    assert "runs as Python" in caplog.text
    assert scripted(joined)(["a", 1]) == "a 1"

import pytest
import torch
import torch.nn.functional as nnf

from training.losses import token_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_cross_entropy_is_torchs_in_value_and_gradient(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(40, 17, requires_grad=True)
    targets = torch.randint(0, 17, (40,))
    targets[::3] = 0  # padding
    ours = token_cross_entropy(logits, targets, ignore_index=0, label_smoothing=smoothing)
    (ours_grad,) = torch.autograd.grad(ours * 3, logits)
    theirs = nnf.cross_entropy(logits, targets, ignore_index=0, label_smoothing=smoothing)
    (theirs_grad,) = torch.autograd.grad(theirs * 3, logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_token_cross_entropy_of_only_padding_is_zero_and_shapes_are_checked():
    logits = torch.randn(3, 5, requires_grad=True)
    assert token_cross_entropy(logits, torch.zeros(3, dtype=torch.long), ignore_index=0).item() == 0.0
    with pytest.raises(ValueError, match=r"logits \(M, V\)"):
        token_cross_entropy(logits[None], torch.zeros(3, dtype=torch.long), ignore_index=0)

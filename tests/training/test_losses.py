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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_cross_entropy_over_allowed_words_is_the_plain_formula(dtype):
    """Self-critical training's loss: each token weighted (its caption's advantage), the
    distribution renormalised over the words the sampler could draw; bf16 logits (autocast)
    give the float32 formula's value and a gradient in their own dtype."""
    torch.manual_seed(0)
    logits = torch.randn(30, 11).to(dtype).requires_grad_()
    targets = torch.randint(3, 11, (30,))
    targets[::4] = 0  # padding
    targets[:5] = targets[:5].clamp(max=9)  # not the word excluded on those rows
    weights = torch.randn(30)
    banned = torch.tensor([0, 1, 2])  # the padding word among them, as in a vocabulary's never-generated words

    def exclude(flat):
        flat.index_fill_(1, banned, float("-inf"))
        flat[:5, 10] = float("-inf")  # a word excluded on some rows only
    ours = token_cross_entropy(logits, targets, ignore_index=0, weights=weights, exclude=exclude)
    (ours_grad,) = torch.autograd.grad(ours * 2, logits)
    reference = logits.float().index_fill(1, banned, float("-inf"))
    reference[:5, 10] = float("-inf")
    keep = targets != 0
    logp = reference.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1).masked_fill(~keep, 0.0)
    theirs = -(weights * logp).sum() / keep.sum()
    (theirs_grad,) = torch.autograd.grad(theirs * 2, logits)
    assert ours_grad.dtype == dtype and torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
    assert torch.all(ours_grad[:, banned] == 0)
    with pytest.raises(ValueError, match="label smoothing"):
        token_cross_entropy(logits, targets, ignore_index=0, label_smoothing=0.1, exclude=exclude)

"""Token cross-entropy with a lean backward pass, for the (tokens, vocabulary) logits of a
training step.

`nnf.cross_entropy` keeps its log-probabilities, and its backward allocates a zero-filled
gradient for the negative log-likelihood, scatters into it and then allocates the log-softmax's
gradient: four passes over an (M, V) tensor that, at 3,360 tokens x 3,630 words, is 49 MB. Here
the backward turns the saved log-probabilities into the gradient in place (softmax, minus the
smoothed one-hot target, times each token's weight): the same values, in about 60% of the time
on 2 CPU cores. The saved tensor is consumed, so the graph can be backpropagated once.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, smoothing: float):
        logp = torch.log_softmax(logits, dim=-1)  # (M, V)
        keep = targets != ignore_index
        safe = targets.masked_fill(~keep, 0)
        count = keep.sum().clamp(min=1)
        nll = -logp.gather(1, safe[:, None]).squeeze(1)  # (M,)
        if smoothing > 0:  # as nnf.cross_entropy: (1 - e) x nll + e x the mean over the vocabulary
            nll = (1 - smoothing) * nll - smoothing * logp.mean(dim=1)
        ctx.save_for_backward(logp, safe, keep, count)
        ctx.smoothing = smoothing
        return (nll * keep).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, safe, keep, count = ctx.saved_tensors
        smoothing = ctx.smoothing
        gradient = logp.exp_()  # the softmax, in place of the log-probabilities
        if smoothing > 0:
            gradient.sub_(smoothing / gradient.shape[1])
        gradient.scatter_add_(1, safe[:, None], gradient.new_full((gradient.shape[0], 1), -(1 - smoothing)))
        gradient.mul_((keep.to(gradient.dtype) * (grad / count))[:, None])
        return gradient, None, None, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (M, V) against targets (M,) over the tokens that are not
    `ignore_index`: `nnf.cross_entropy(..., ignore_index=, label_smoothing=)`, leaner backward."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits (M, V) and targets (M,) expected, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return _TokenCrossEntropy.apply(logits, targets, ignore_index, float(label_smoothing))

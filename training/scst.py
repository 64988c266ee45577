"""Self-critical sequence training (Rennie et al., 2017): fine-tune a cross-entropy model on the
metric itself. For each image the decoder samples K captions; each is rewarded with its CIDEr-D
against the image's references, minus the mean reward of the image's other K-1 samples (the
baseline of Luo, 2020: no extra greedy decode, and the advantages of an image sum to zero). The
loss is the REINFORCE estimate, -advantage x log p(caption), averaged over the sampled tokens.
As in Luo's reference code, `<eos>` counts as a word of the finished samples and of the references,
so the reward sees how a caption ends: one cut off by the length limit ("a man in a") misses the
references' final n-grams ("grass <eos>").

With `object_weight` w the reward also counts the objects the caption names (`training.objects`,
the lexicon of the object metrics): w x the share of the image's salient objects it names (those
at least 3 of its references name; 0 for an image without any), minus `object_penalty` (default
w) x the number of objects it names that no reference names. CIDEr-D rewards a named object only
through its n-grams, and a caption that names the main object with other words can score as well
as one that misses it. The share is per image, where the reported `object_recall` counts over all
objects of a split. `scene_penalty` q subtracts q per scene (`training.objects.SCENES`: food,
kitchen, street, water, grass) the caption names that no reference names: the scene a Flickr-trained
decoder adds by habit ("... in the grass").

The decoder samples in training mode: dropout keeps the model from simply sharpening onto the
captions it has memorised for the training images (in eval mode the reward of its samples rises
while its beam-search captions do not change). The training loop replays the sampling's dropout
masks in the gradient pass, so the gradient is for exactly the policy that sampled.
"""

from __future__ import annotations

import dataclasses

import torch

from captioner.decoding import DecodeConfig, Hypothesis, generate
from captioner.vocab import Vocabulary

from .batches import pad_sequences
from .cider import CiderD
from .losses import token_cross_entropy
from .objects import mentioned_objects, mentioned_scenes, reference_objects

EOS_WORD = "<eos>"  # never a word of a tokenised caption


def resolved_penalty(object_weight: float, object_penalty: float | None) -> float:
    """The penalty per unsupported object: the object weight unless given on its own."""
    return object_weight if object_penalty is None else object_penalty


class SelfCritical:
    def __init__(self, vocab: Vocabulary, references: list[list[list[str]]], *, samples: int, max_new_tokens: int,
                 object_weight: float = 0.0, object_penalty: float | None = None, scene_penalty: float = 0.0):
        """references: per training image (indexed as in the batches), its tokenised captions."""
        if samples < 2:
            raise ValueError("self-critical training needs at least 2 samples per image for its baseline")
        self.vocab = vocab
        self.cider = CiderD([[[*ref, EOS_WORD] for ref in refs] for refs in references])
        self.object_weight = object_weight
        self.object_penalty = resolved_penalty(object_weight, object_penalty)
        self.scene_penalty = scene_penalty
        texts = [[" ".join(ref) for ref in refs] for refs in references]
        self.objects = [reference_objects(refs) for refs in texts] if object_weight or self.object_penalty else []
        self.scenes = [reference_objects(refs, mentioned=mentioned_scenes)[1] for refs in texts] if scene_penalty else []
        self.decode = DecodeConfig(num_beams=1, do_sample=True, num_return_sequences=samples,
                                   max_new_tokens=max_new_tokens, no_repeat_ngram_size=0)

    def sample(self, decoder, regions: torch.Tensor, pooled: torch.Tensor, seed: int) -> list[list[Hypothesis]]:
        """K sampled captions per image of regions (B, P, E), pooled (B, E), in row order."""
        config = dataclasses.replace(self.decode, seed=seed)
        return generate(decoder, regions, pooled, config, bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id,
                        banned_ids=self.vocab.never_generated, best_first=False)

    def advantages(self, images: list[int], hypotheses: list[list[Hypothesis]]) -> tuple[torch.Tensor, float]:
        """-> (advantage per sequence (B*K,), mean reward)."""
        rewards = torch.tensor([[self.reward(image, self._words(h)) for h in hyps]
                                for image, hyps in zip(images, hypotheses)])  # (B, K)
        k = rewards.shape[1]
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
        return (rewards - baseline).flatten(), float(rewards.mean())

    def reward(self, image: int, words: list[str]) -> float:
        """CIDEr-D of the caption's words (with `<eos>` where it finished), plus the object and scene terms."""
        reward = self.cider.score(image, words)
        caption = " ".join(w for w in words if w != EOS_WORD)
        if self.object_weight or self.object_penalty:
            salient, in_references = self.objects[image]
            named = mentioned_objects(caption)
            recall = len(named & salient) / len(salient) if salient else 0.0
            reward += self.object_weight * recall - self.object_penalty * len(named - in_references)
        if self.scene_penalty:
            reward -= self.scene_penalty * len(mentioned_scenes(caption) - self.scenes[image])
        return reward

    def _words(self, hypothesis: Hypothesis) -> list[str]:
        words = [self.vocab.words[t] for t in hypothesis.tokens]
        return [*words, EOS_WORD] if hypothesis.finished else words

    def sequences(self, hypotheses: list[list[Hypothesis]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> decoder inputs (N, T) `<bos> w1..wn` and targets (N, T) `w1..wn [<eos>]`, padded."""
        bos, eos = self.vocab.bos_id, self.vocab.eos_id
        flat = [h for hyps in hypotheses for h in hyps]
        inputs = pad_sequences([[bos, *h.tokens] for h in flat], self.vocab.pad_id)
        targets = pad_sequences([[*h.tokens, eos] if h.finished else [*h.tokens, self.vocab.pad_id] for h in flat],
                                self.vocab.pad_id)
        return inputs, targets  # the same lengths row by row

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """-mean over the sampled tokens of advantage x log p(token): logits (N, T, V) of the
        sampled sequences, targets (N, T), advantages (N,)."""
        n, t, v = logits.shape
        banned = torch.tensor(self.vocab.never_generated, dtype=torch.long, device=logits.device)
        early = self.decode.min_new_tokens

        def exclude(flat: torch.Tensor) -> None:
            """The distribution the sampler drew from: no banned words, no <eos> before min_new_tokens."""
            flat.index_fill_(1, banned, float("-inf"))
            flat.view(n, t, v)[:, :early, self.vocab.eos_id] = float("-inf")

        weights = advantages.to(logits.device, torch.float32)[:, None].expand(n, t).flatten()
        return token_cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.vocab.pad_id,
                                   weights=weights, exclude=exclude)

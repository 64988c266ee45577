"""Self-critical training: the CIDEr-D reward equals the toolkit's score, the advantages and the
loss do what REINFORCE needs, and fine-tuning a trained model on its reward raises it."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.decoder import Decoder, DecoderConfig
from captioner.vocab import Vocabulary, tokenize
from tests.training.conftest import tiny_train_overrides
from training.cider import CiderD
from training.config import load_config
from training.metrics import caption_metrics
from training.scst import SelfCritical
from training.train import main

REFERENCES = {
    "a": ["a dog runs on the grass", "a brown dog is running through a field", "the dog plays outside"],
    "b": ["a man rides a bike in the park", "a cyclist on a path", "a person riding a bicycle"],
    "c": ["two children play in the snow", "kids playing in snow", "two young kids outside in the snow"],
    "d": ["a red ball on the grass", "the red ball lies in a field", "a ball"],
}
CANDIDATES = {"a": "a dog running on the grass", "b": "a man riding a bike", "c": "a child in the snow",
              "d": "a dog on the grass"}


def test_cider_d_reward_equals_the_coco_caption_toolkit():
    ids = sorted(REFERENCES)
    scorer = CiderD([[tokenize(r) for r in REFERENCES[i]] for i in ids])
    ours = [scorer.score(n, tokenize(CANDIDATES[i])) for n, i in enumerate(ids)]
    toolkit = caption_metrics(CANDIDATES, REFERENCES, meteor=False)["CIDEr-D"]
    assert sum(ours) / len(ours) == pytest.approx(toolkit, abs=1e-9)
    assert scorer.score(0, tokenize("a dog runs on the grass")) > scorer.score(0, tokenize("a man in the snow"))
    assert scorer.score(0, []) == 0.0


def test_advantages_use_the_other_samples_as_baseline_and_the_loss_follows_them():
    vocab = Vocabulary.build((c for refs in REFERENCES.values() for c in refs), min_count=1)
    references = [[tokenize(r) for r in REFERENCES[i]] for i in sorted(REFERENCES)]
    critic = SelfCritical(vocab, references, samples=3, max_new_tokens=8)

    class H:  # a sampled hypothesis: word ids without <eos>
        def __init__(self, text, finished=True):
            self.tokens, self.finished = vocab.encode(text, add_special=False), finished

    hyps = [[H("a dog runs on the grass"), H("a man"), H("the snow", finished=False)]]
    advantages, reward = critic.advantages([0], hyps)
    assert advantages.shape == (3,) and advantages.sum().abs() < 1e-6  # zero-sum within an image
    assert advantages[0] > 0 > advantages[1]
    # The ending counts: the same words score less when the length limit cut them off.
    cut_off, _ = critic.advantages([0], [[H("a dog runs on the grass"), H("a dog runs on the grass", False), H("a")]])
    assert cut_off[0] > cut_off[1]
    inputs, targets = critic.sequences(hyps)
    assert inputs[0, 0] == vocab.bos_id and targets[0, 6] == vocab.eos_id
    assert targets[2, 2] == vocab.pad_id  # an unfinished caption gets no <eos> target
    logits = torch.zeros(3, inputs.shape[1], len(vocab), requires_grad=True)
    critic.loss(logits, targets, advantages).backward()
    # Gradient descent raises the log-probability of the better-than-baseline caption's words.
    first_word = targets[0, 0]
    assert logits.grad[0, 0, first_word] < 0 < logits.grad[1, 0, targets[1, 0]]


def test_the_object_term_rewards_salient_objects_and_penalises_unsupported_ones():
    """With object_weight w: + w x the share of the objects at least 3 references name, - w (or
    object_penalty) per object no reference names; the CIDEr-D part is unchanged."""
    references = {"cat": ["a cat sitting on a laptop", "a cat on a laptop keyboard", "a kitten lying on a laptop",
                          "a grey cat near a phone", "a cat and a laptop and a phone on a desk"],
                  "sky": ["the blue sky", "clouds in a blue sky", "a clear sky", "a dog under the sky", "blue sky above"]}
    vocab = Vocabulary.build((c for refs in references.values() for c in refs), min_count=1)
    tokens = [[tokenize(r) for r in refs] for refs in references.values()]
    plain = SelfCritical(vocab, tokens, samples=2, max_new_tokens=8)
    critic = SelfCritical(vocab, tokens, samples=2, max_new_tokens=8, object_weight=0.5)
    # cat and laptop are salient (3+ references); the phone (2 references) and the desk (dining
    # table, 1) are only supported: naming them earns nothing and costs nothing
    for words, objects in ((["a", "cat", "on", "a", "laptop"], 1.0), (["a", "cat", "on", "a", "desk"], 0.5),
                           (["a", "cat", "near", "a", "phone"], 0.5), (["a", "dog", "on", "a", "laptop"], 0.5 - 1),
                           (["a", "grey", "desk"], 0.0)):
        assert critic.reward(0, [*words, "<eos>"]) == pytest.approx(plain.reward(0, [*words, "<eos>"]) + 0.5 * objects)
    # a photo without salient objects: no share to earn, the penalty still applies
    assert critic.reward(1, ["a", "blue", "sky", "<eos>"]) == pytest.approx(plain.reward(1, ["a", "blue", "sky", "<eos>"]))
    assert critic.reward(1, ["a", "cat", "<eos>"]) == pytest.approx(plain.reward(1, ["a", "cat", "<eos>"]) - 0.5)
    assert critic.reward(1, ["a", "dog", "<eos>"]) == pytest.approx(plain.reward(1, ["a", "dog", "<eos>"]))  # supported
    # a penalty of its own, also without the share
    for weight, penalty, change in ((1.0, 0.25, 0.5 - 0.25), (0.0, 0.5, -0.5)):
        weighed = SelfCritical(vocab, tokens, samples=2, max_new_tokens=8, object_weight=weight, object_penalty=penalty)
        words = ["a", "dog", "on", "a", "laptop", "<eos>"]
        assert weighed.reward(0, words) == pytest.approx(plain.reward(0, words) + change)

    # and the advantages follow it: two samples with the same words but one object apart
    class H:
        def __init__(self, text):
            self.tokens, self.finished = vocab.encode(text, add_special=False), True

    samples = [[H("a cat on a laptop"), H("a dog on a laptop")]]
    (first, second), _ = critic.advantages([0], samples)
    (plain_first, plain_second), _ = plain.advantages([0], samples)
    # each advantage is the reward less the other's: the gap doubles the rewards' object difference
    assert float(first - second) == pytest.approx(float(plain_first - plain_second) + 2 * 0.5 * 1.5, abs=1e-5)


def test_the_scene_penalty_counts_scenes_no_reference_names():
    """With scene_penalty q: - q per scene (food, kitchen, street, water, grass) the caption names
    that no reference names, whatever words name it; scenes the references name cost nothing."""
    references = [["a dog runs on the grass", "a dog in a field", "a brown dog", "a dog running", "a dog playing"]]
    vocab = Vocabulary.build((c for refs in references for c in refs), min_count=1)
    tokens = [[tokenize(r) for r in refs] for refs in references]
    plain = SelfCritical(vocab, tokens, samples=2, max_new_tokens=8)
    critic = SelfCritical(vocab, tokens, samples=2, max_new_tokens=8, scene_penalty=0.25)
    for words, scenes in ((["a", "dog", "on", "the", "lawn"], 0), (["a", "dog", "in", "the", "lake"], 1),
                          (["a", "dog", "on", "a", "street", "by", "the", "sea"], 2), (["a", "dog"], 0)):
        assert critic.reward(0, [*words, "<eos>"]) == pytest.approx(plain.reward(0, [*words, "<eos>"]) - 0.25 * scenes)


def test_self_critical_steps_raise_the_reward():
    """REINFORCE on a fixed batch: the sampled captions' CIDEr-D against each image's own
    references must climb well above where it starts."""
    torch.manual_seed(0)
    ids = sorted(REFERENCES)
    vocab = Vocabulary.build((c for refs in REFERENCES.values() for c in refs), min_count=1)
    critic = SelfCritical(vocab, [[tokenize(r) for r in REFERENCES[i]] for i in ids], samples=4, max_new_tokens=8)
    decoder = Decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=12, embed_dim=16, hidden_dim=32,
                                    memory_dim=24, attention_dim=16, dropout=0.0))
    regions = torch.randn(len(ids), 5, 12)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.01)
    rewards = []
    for step in range(80):
        decoder.eval()
        hypotheses = critic.sample(decoder, regions, regions.mean(dim=1), seed=step)
        advantages, reward = critic.advantages(list(range(len(ids))), hypotheses)
        sequences, targets = critic.sequences(hypotheses)
        logits, _ = decoder(regions, regions.mean(dim=1), sequences)
        optimizer.zero_grad()
        critic.loss(logits, targets, advantages).backward()
        optimizer.step()
        rewards.append(reward)
    assert sum(rewards[-10:]) / 10 > 2 * sum(rewards[:10]) / 10


@pytest.mark.parametrize("autocast", [False, True])
def test_the_gradient_pass_replays_the_sampling_policy_dropout_included(autocast):
    """With bf16 autocast (as training samples and differentiates on bf16 hardware) too: both
    passes compute in the same precision, so the policy differentiated is the one that sampled."""
    torch.manual_seed(0)
    ids = sorted(REFERENCES)
    vocab = Vocabulary.build((c for refs in REFERENCES.values() for c in refs), min_count=1)
    critic = SelfCritical(vocab, [[tokenize(r) for r in REFERENCES[i]] for i in ids], samples=3, max_new_tokens=6)
    decoder = Decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=12, embed_dim=16, hidden_dim=32,
                                    memory_dim=24, attention_dim=16, dropout=0.5)).train()
    regions = torch.randn(len(ids), 5, 12)
    rng = torch.get_rng_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hypotheses = critic.sample(decoder, regions, regions.mean(dim=1), seed=3)
    torch.set_rng_state(rng)
    sequences, targets = critic.sequences(hypotheses)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = decoder(regions, regions.mean(dim=1), sequences)
    logits = logits.float()
    # The sampler records log-softmax values before removing banned words (as beam search ranks).
    logp = logits.log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    flat = [h for hyps in hypotheses for h in hyps]
    for row, h in enumerate(flat):
        assert torch.allclose(logp[row, : len(h.token_log_probs)], torch.tensor(h.token_log_probs), atol=1e-4)
    assert not torch.equal(logits, decoder(regions, regions.mean(dim=1), sequences)[0])  # other masks


def test_self_critical_fine_tuning_runs_from_a_checkpoint(flickr_dir, tmp_path):
    base = tmp_path / "xe"
    main(load_config(None, tiny_train_overrides(flickr_dir, base, **{"optim.epochs": 2})))
    out = tmp_path / "scst"
    cfg = load_config(None, tiny_train_overrides(flickr_dir, out, **{
        "model.init_from": str(base / "best.pt"), "optim.objective": "scst", "optim.epochs": 2,
        "optim.scst_samples": 3, "model.decoder.hidden_dim": 8}))  # the architecture comes from the checkpoint
    main(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["train_reward"] >= 0 for r in records)
    payload = torch.load(out / "last.pt", weights_only=True)
    xe = torch.load(base / "best.pt", weights_only=True)
    assert payload["provenance"]["init_from"]["path"] == str(base / "best.pt")
    assert payload["vocabulary"] == xe["vocabulary"] and payload["decoder"] == xe["decoder"]
    assert not torch.equal(payload["state_dict"]["decoder.word_gates.weight"], xe["state_dict"]["decoder.word_gates.weight"])


@pytest.mark.parametrize("option", ["optim.scst_object_weight", "optim.scst_scene_penalty"])
def test_reward_terms_need_the_self_critical_objective(flickr_dir, tmp_path, option):
    cfg = load_config(None, tiny_train_overrides(flickr_dir, tmp_path / "xe", **{option: 0.3}))
    with pytest.raises(ValueError, match="need optim.objective=scst"):
        main(cfg)

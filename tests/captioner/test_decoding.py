from unittest import mock

import pytest
import torch

from captioner.decoder import Decoder
from captioner.decoding import BeamState, DecodeConfig, generate
from tests.conftest import tiny_decoder_config

P, E, V = 5, 24, 20
SPECIAL = dict(bos_id=1, eos_id=2, banned_ids=(0, 1, 3))


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(3)
    model = Decoder(tiny_decoder_config(V)).eval()
    with torch.no_grad():  # make <eos> likely enough that captions end at varied lengths
        model.output_bias[2] += 2.0
    return model


def _images(count, seed=0):
    regions = torch.randn(count, P, E, generator=torch.Generator().manual_seed(seed))
    return regions, regions.mean(dim=1)


def _run(decoder, regions, pooled, **options):
    return generate(decoder, regions, pooled, DecodeConfig(**options), **SPECIAL)


def test_beam_size_one_equals_greedy(decoder):
    """The beam-search code path with one beam against the greedy code path."""
    regions, pooled = _images(8)
    greedy = _run(decoder, regions, pooled, num_beams=1)
    from captioner.decoding import _beam_search, token_rules

    config = DecodeConfig(num_beams=1)
    rules = token_rules(config, SPECIAL["eos_id"], SPECIAL["banned_ids"], V)
    with torch.no_grad():
        beamed = _beam_search(decoder, decoder.init_state(regions, pooled), SPECIAL["bos_id"], SPECIAL["eos_id"],
                              rules, config)
    assert [r[0].tokens for r in beamed] == [r[0].tokens for r in greedy]
    for b, g in zip(beamed, greedy):
        assert b[0].log_prob == pytest.approx(g[0].log_prob, abs=1e-4)


def test_beam_search_finds_at_least_greedy_log_probability_on_average(decoder):
    regions, pooled = _images(24, seed=1)
    options = dict(length_penalty=0.0, no_repeat_ngram_size=0, min_new_tokens=3)
    greedy = [r[0].log_prob for r in _run(decoder, regions, pooled, num_beams=1, **options)]
    beam = [r[0].log_prob for r in _run(decoder, regions, pooled, num_beams=5, **options)]
    assert sum(beam) / len(beam) >= sum(greedy) / len(greedy) - 1e-6
    assert sum(b > g + 1e-6 for b, g in zip(beam, greedy)) >= 1  # and it does find better ones


def test_n_best_is_sorted_distinct_and_consistent(decoder):
    regions, pooled = _images(6, seed=2)
    for result in _run(decoder, regions, pooled, num_beams=5, num_return_sequences=4):
        assert len(result) == 4
        scores = [h.score for h in result]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in result}) == 4
        for h in result:
            assert h.log_prob == pytest.approx(sum(h.token_log_probs), abs=1e-4)
            assert len(h.token_log_probs) == len(h.tokens) + int(h.finished)
            assert h.score == pytest.approx(h.log_prob / len(h.token_log_probs), abs=1e-4)


def test_sampling_is_reproducible_with_a_seed(decoder):
    regions, pooled = _images(4, seed=3)
    options = dict(num_beams=1, do_sample=True, top_k=8, top_p=0.9, temperature=1.3, num_return_sequences=3)
    first = _run(decoder, regions, pooled, seed=7, **options)
    again = _run(decoder, regions, pooled, seed=7, **options)
    other = _run(decoder, regions, pooled, seed=8, **options)
    tokens = lambda results: [[h.tokens for h in r] for r in results]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)


def test_sampling_draws_each_word_at_its_probability_and_never_a_zero_weight_one():
    """The sampler's one-uniform-per-row draw: frequencies match the weights (unnormalised, as
    the sampler passes them), and words of weight zero (banned ones), first and last included,
    never come out, even where the uniform number lands on a partial sum's edge."""
    from captioner.decoding import _categorical

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 0.0])
    rows = weights.expand(40_000, -1)
    drawn = _categorical(rows, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=len(weights)).double() / len(drawn)
    assert torch.allclose(frequencies, weights.double() / weights.sum(), atol=0.01)
    assert not frequencies[weights == 0].any()
    # A uniform draw of 0, and one whose product with the total rounds up to the total, pick the
    # first and the last word of positive weight.
    from unittest import mock
    for u, expected in ((0.0, 1), (1.0, 6)):
        with mock.patch("torch.rand", lambda shape, **kw: torch.full(shape, u, dtype=kw["dtype"])):
            assert _categorical(weights[None], None).tolist() == [expected]


def test_sampling_from_log_probs_draws_as_from_the_masked_logits():
    """The sampler weighs words by exp(log p - max): the same draws, with the same generator, as
    exp(logits - max) with the banned words masked, and never a banned word."""
    from captioner.decoding import NEG_INF, _categorical, _draw

    torch.manual_seed(0)
    logits = torch.randn(2000, 50) * 3
    logp = logits.log_softmax(dim=-1)
    logp[:, :3] = NEG_INF  # banned words
    logp[::2, 7] = NEG_INF  # a word banned on some rows only
    drawn = _draw(logp, DecodeConfig(num_beams=1, do_sample=True), torch.Generator().manual_seed(1))
    scores = logits.masked_fill(logp == NEG_INF, NEG_INF)
    general = _categorical((scores - scores.amax(dim=-1, keepdim=True)).exp(), torch.Generator().manual_seed(1))
    assert torch.equal(drawn, general)
    assert not (drawn < 3).any() and not (drawn[::2] == 7).any()


def test_bans_follow_each_row_to_its_image_as_images_leave():
    """Words fixed per image (special tokens, excluded words) are banned on exactly the rows of
    that image, also after other images have left the batch; per-step rules still apply."""
    from captioner.decoding import NEG_INF, Bans, BanTokens, ExcludeWords, NoRepeatNgram

    bans = Bans([BanTokens((0,)), ExcludeWords([[4], [5], [6]]), NoRepeatNgram(1)], images=3, device="cpu")
    logits = torch.zeros(6, 10)
    history = [[7], [9], [9], [9], [9], [9]]
    banned = bans.log_probs(logits, history, [0, 0, 1, 1, 2, 2]) == NEG_INF
    assert banned[:, 0].all() and banned[0, 7] and banned[1:, 9].all()
    assert banned[:2, 4].all() and banned[2:4, 5].all() and banned[4:, 6].all() and banned.sum() == 6 + 6 + 6
    banned = bans.log_probs(logits[:2], history[:2], [2, 2]) == NEG_INF
    assert banned[:, 6].all() and not banned[:, 4:6].any() and banned[0, 7] and banned[1, 9]


def test_no_repeat_ngram_bans_the_word_that_would_repeat_an_ngram():
    """Each row may not say the word that would complete an n-gram it has already said."""
    from captioner.decoding import NoRepeatNgram

    bans = [set() for _ in range(4)]
    histories = [[5, 6, 7, 5, 6], [5, 6, 5, 6, 5], [5, 6, 7, 8], [5, 6]]
    NoRepeatNgram(3)(bans, histories, [0, 0, 0, 0])
    assert bans == [{7}, {6}, set(), set()]
    bans = [set() for _ in range(2)]
    NoRepeatNgram(2)(bans, [[4, 5, 4, 6, 4], [4, 5]], [0, 0])
    assert bans == [{5, 6}, set()]


def test_a_fixed_rule_after_a_lifting_rule_still_bans():
    """Rules keep their list order: words excluded after EndWhenStuck stay banned even where it
    lifted <eos> (here image 0 excludes <eos>, image 1 does not)."""
    from captioner.decoding import NEG_INF, Bans, BanTokens, EndWhenStuck, ExcludeWords, MinLength

    rules = [BanTokens((0, 2, 3)), MinLength(eos=1, min_new_tokens=5), EndWhenStuck(eos=1, vocab_size=4),
             ExcludeWords([[1], []])]
    logp = Bans(rules, images=2, device="cpu").log_probs(torch.zeros(2, 4), [[], []], [0, 1])
    assert (logp[0] == NEG_INF).all() and logp[1, 1] > NEG_INF


def test_decoding_stops_at_eos_and_respects_max_new_tokens(decoder):
    regions, pooled = _images(10, seed=4)
    for beams in (1, 3):
        results = _run(decoder, regions, pooled, num_beams=beams, max_new_tokens=4)
        for result in results:
            h = result[0]
            assert len(h.token_log_probs) <= 4
            assert 2 not in h.tokens  # <eos> ends a caption, never appears inside it
            assert not set(h.tokens) & {0, 1, 3}  # special tokens are never generated


def test_min_new_tokens_and_no_repeat_ngram(decoder):
    regions, pooled = _images(10, seed=5)
    for beams in (1, 3):
        for result in _run(decoder, regions, pooled, num_beams=beams, min_new_tokens=5, no_repeat_ngram_size=2):
            tokens = result[0].tokens
            assert len(tokens) >= 5
            bigrams = list(zip(tokens, tokens[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_beam_search_returns_best_unfinished_when_no_beam_finishes():
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(V)).eval()
    with torch.no_grad():
        decoder.output_bias[2] = -1e4  # <eos> is practically impossible
    regions, pooled = _images(3, seed=6)
    results = _run(decoder, regions, pooled, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    for result in results:
        assert len(result) == 2
        assert all(not h.finished and len(h.tokens) == 6 for h in result)


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4, num_return_sequences=2),
                                     dict(num_beams=3, return_attention=True)])
def test_batch_equals_one_by_one(decoder, options):
    regions, pooled = _images(7, seed=8)
    batched = _run(decoder, regions, pooled, **options)
    for i in range(7):
        alone = _run(decoder, regions[i:i + 1], pooled[i:i + 1], **options)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert a.score == pytest.approx(b.score, abs=1e-4)
            if options.get("return_attention"):
                assert torch.allclose(a.attention, b.attention, atol=1e-5)


def test_attention_maps_cover_each_generated_token(decoder):
    regions, pooled = _images(2, seed=9)
    for beams in (1, 3):
        for result in _run(decoder, regions, pooled, num_beams=beams, return_attention=True):
            h = result[0]
            assert h.attention.shape == (len(h.token_log_probs), P)
            assert torch.allclose(h.attention.sum(dim=-1), torch.ones(len(h.token_log_probs)), atol=1e-5)


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(num_beams=2, num_return_sequences=3),
                                 dict(temperature=0), dict(top_p=1.5), dict(max_new_tokens=1000),
                                 dict(num_beams="3"), dict(do_sample=True, num_beams=2),
                                 dict(min_new_tokens=30, max_new_tokens=20)])
def test_invalid_options_are_clear_value_errors(bad):
    with pytest.raises(ValueError):
        DecodeConfig(**bad)
    with pytest.raises(ValueError, match="unknown decoding option"):
        DecodeConfig.from_kwargs(beam_size=3)


# -- required words (constrained beam search) -------------------------------------------------

def _says(hypothesis, ids) -> bool:
    return any(i in hypothesis.tokens for i in ids)


def test_required_words_appear_in_every_returned_caption(decoder):
    regions, pooled = _images(6, seed=11)
    plain = _run(decoder, regions, pooled, num_beams=3)
    # Words the unconstrained captions do not say, so the constraint has to change them.
    unused = [w for w in range(4, V) if not any(w in r[0].tokens for r in plain)]
    assert len(unused) >= 3
    one, two = (unused[0],), (unused[1], unused[2])  # the second constraint: either of two forms
    constraints = [[one], [one, two], [], [two], [one, two], []]
    results = generate(decoder, regions, pooled, DecodeConfig(num_beams=3, num_return_sequences=2),
                       constraints=constraints, **SPECIAL)
    for required, hyps, before in zip(constraints, results, plain):
        assert len(hyps) == 2
        for h in hyps:
            assert h.finished and all(_says(h, ids) for ids in required)
            assert h.log_prob == pytest.approx(sum(h.token_log_probs), abs=1e-4)
        if not required:  # images without constraints are decoded as before
            assert hyps[0].tokens == before[0].tokens
        else:
            assert hyps[0].log_prob <= before[0].log_prob + 1e-5  # a constraint costs probability


def test_constrained_batch_equals_one_by_one(decoder):
    regions, pooled = _images(5, seed=12)
    constraints = [[(5,)], [(6, 7), (8,)], [], [(9,)], [(5,), (6,), (7,)]]
    config = DecodeConfig(num_beams=3, num_return_sequences=3)
    batch = generate(decoder, regions, pooled, config, constraints=constraints, **SPECIAL)
    for i in range(5):
        alone = generate(decoder, regions[i:i + 1], pooled[i:i + 1], config, constraints=[constraints[i]], **SPECIAL)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in batch[i]]


def _every_word_beam_search(decoder, regions, pooled, k, max_new_tokens):
    """Plain beam search as Hugging Face's `generate` defines it, written out over every word:
    each step ranks all R x V extensions of an image's R rows, an <eos> among the first K ends a
    hypothesis, the best K others go on; an image stops once K have ended (early stopping), or
    after `max_new_tokens` its live beams compete unfinished. -> per image, (tokens, log-prob)
    of its K best, best first."""
    eos, vocab = SPECIAL["eos_id"], decoder.config.vocab_size
    results = []
    for i in range(regions.shape[0]):
        with torch.inference_mode():
            state = decoder.init_state(regions[i:i + 1], pooled[i:i + 1])
        beams, tokens, ended = [(0.0, [])], torch.tensor([SPECIAL["bos_id"]]), []
        for step in range(max_new_tokens):
            with torch.inference_mode():
                logits, state, _ = decoder.step(tokens, state)
            logp = logits.float().log_softmax(dim=-1)
            logp[:, list(SPECIAL["banned_ids"])] = float("-inf")
            cumulative = torch.tensor([logp_sum for logp_sum, _ in beams])[:, None] + logp  # (R, V), fp32
            values, flat = cumulative.flatten().topk(2 * k)
            going = []
            for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist())):
                row, word = divmod(index, vocab)
                if word == eos:
                    if rank < k:
                        ended.append((value / (step + 1), beams[row][1], value))
                elif len(going) < k:
                    going.append((value, beams[row][1] + [word], row))
            if len(ended) >= k:
                break
            beams = [(value, words) for value, words, _ in going]
            tokens = torch.tensor([words[-1] for _, words in beams])
            state = state.reorder(torch.tensor([row for _, _, row in going]))
        else:
            ended += [(value / max_new_tokens, words, value) for value, words in beams]
        ended.sort(key=lambda e: -e[0])  # stable: the earlier on equal scores
        results.append([(words, value) for _, words, value in ended[:k]])
    return results


@pytest.fixture(scope="module", params=[0.0, 0.4])
def unbiased_decoder(request) -> Decoder:
    """The same decoder with less push towards <eos> (none, or a fifth): captions run longer, some
    to the limit, and <eos> comes at every rank."""
    torch.manual_seed(3)
    model = Decoder(tiny_decoder_config(V)).eval()
    with torch.no_grad():
        model.output_bias[2] += request.param
    return model


@pytest.mark.parametrize("k", [2, 3, 5])
def test_beam_search_finds_what_ranking_every_word_finds(unbiased_decoder, k):
    """Each row offers only its best K + 1 words (no others could continue or end), yet plain
    beam search keeps the hypotheses a search over every word keeps, alone and in a batch with
    required words for other images."""
    regions, pooled = _images(16, seed=23)
    config = DecodeConfig(num_beams=k, num_return_sequences=k, min_new_tokens=0, no_repeat_ngram_size=0,
                          max_new_tokens=8)
    expected = _every_word_beam_search(unbiased_decoder, regions, pooled, k, config.max_new_tokens)
    assert {len(words) for want in expected for words, _ in want} >= {config.max_new_tokens}  # some reach the limit
    plain = generate(unbiased_decoder, regions, pooled, config, **SPECIAL)
    constraints = [[(5,)] if image % 3 == 1 else [] for image in range(16)]
    mixed = generate(unbiased_decoder, regions, pooled, config, constraints=constraints, **SPECIAL)
    for image, want in enumerate(expected):
        for results in [plain] + ([mixed] if not constraints[image] else []):
            assert [h.tokens for h in results[image]] == [words for words, _ in want]
            assert [h.log_prob for h in results[image]] == pytest.approx([logp for _, logp in want], abs=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_rows_offering_every_word_change_no_hypothesis(unbiased_decoder, k, early_stopping):
    """Guided search offers each row's best width + 1 words besides the required ones; offering
    every word chooses the same, also with more required words than beams (one beam and three
    words: the first step's single row must fill four rows)."""
    regions, pooled = _images(8, seed=1)
    constraints = [[(5,), (5, 6)], [(6,), (6,)], [], [(7,), (8,), (9,)], [(5, 11)], [], [(12,), (13,)],
                   [(4,), (14,), (15,)]]
    config = DecodeConfig(num_beams=k, num_return_sequences=k, max_new_tokens=8, early_stopping=early_stopping,
                          no_repeat_ngram_size=0, min_new_tokens=0)
    offered = generate(unbiased_decoder, regions, pooled, config, constraints=constraints, **SPECIAL)
    with mock.patch.object(BeamState, "offered", lambda self: V):
        every = generate(unbiased_decoder, regions, pooled, config, constraints=constraints, **SPECIAL)
    def found(results):
        return [[(h.tokens, h.log_prob) for h in hypotheses] for hypotheses in results]

    assert found(offered) == found(every)


def test_required_word_with_one_beam_and_with_attention(decoder):
    regions, pooled = _images(3, seed=13)
    results = generate(decoder, regions, pooled, DecodeConfig(num_beams=1, return_attention=True),
                       constraints=[[(10,)], [(11,)], [(12,), (13,)]], **SPECIAL)
    for required, hyps in zip([[(10,)], [(11,)], [(12,), (13,)]], results):
        h = hyps[0]
        assert all(_says(h, ids) for ids in required)
        assert h.attention.shape == (len(h.token_log_probs), P)


def test_required_words_reject_sampling_and_too_many(decoder):
    regions, pooled = _images(1)
    with pytest.raises(ValueError, match="do_sample"):
        generate(decoder, regions, pooled, DecodeConfig(num_beams=1, do_sample=True), constraints=[[(5,)]], **SPECIAL)
    with pytest.raises(ValueError, match="at most"):
        generate(decoder, regions, pooled, DecodeConfig(), constraints=[[(5,), (6,), (7,), (8,)]], **SPECIAL)
    with pytest.raises(ValueError, match="outside"):
        generate(decoder, regions, pooled, DecodeConfig(), constraints=[[(V + 3,)]], **SPECIAL)


def test_unmet_constraint_still_gives_a_caption(decoder):
    """A word that cannot fit in max_new_tokens: the best beams of any state are returned."""
    regions, pooled = _images(2, seed=14)
    results = generate(decoder, regions, pooled, DecodeConfig(num_beams=2, max_new_tokens=1, min_new_tokens=1),
                       constraints=[[(5,), (6,)], []], **SPECIAL)
    assert all(len(r) == 1 and r[0].tokens for r in results)


def test_excluded_words_never_appear(decoder):
    regions, pooled = _images(4, seed=15)
    plain = _run(decoder, regions, pooled, num_beams=3)
    said = [sorted(set(r[0].tokens)) for r in plain]
    excluded = [said[0], [], said[2][:1], said[3]]
    results = generate(decoder, regions, pooled, DecodeConfig(num_beams=3, num_return_sequences=2),
                       excluded=excluded, **SPECIAL)
    for ban, hyps, before in zip(excluded, results, plain):
        for h in hyps:
            assert not set(ban) & set(h.tokens)
        if not ban:
            assert hyps[0].tokens == before[0].tokens
    both = generate(decoder, regions[:1], pooled[:1], DecodeConfig(num_beams=2), constraints=[[(said[1][0],)]],
                    excluded=[said[0]], **SPECIAL)
    assert said[1][0] in both[0][0].tokens and not set(said[0]) & set(both[0][0].tokens)
    with pytest.raises(ValueError, match="both required and excluded"):
        generate(decoder, regions[:1], pooled[:1], DecodeConfig(), constraints=[[(5,)]], excluded=[[5]], **SPECIAL)


def test_guided_search_decodes_as_many_rows_as_plain_search(decoder):
    """Dynamic beam allocation: with fewer required words than beams, every step decodes K rows
    per image, as plain beam search does (not K per subset of words met); the first, <bos> only,
    one."""
    regions, pooled = _images(4, seed=16)
    rows = []
    step = decoder.step

    def counting(tokens, state):
        rows.append(tokens.shape[0])
        return step(tokens, state)

    with mock.patch.object(decoder, "step", counting):
        generate(decoder, regions, pooled, DecodeConfig(num_beams=3), constraints=[[(5,), (6,)]] * 4, **SPECIAL)
        guided = rows[:]
        rows.clear()
        _run(decoder, regions, pooled, num_beams=3)
    assert guided[0] == rows[0] == 4
    assert guided[1] == rows[1] == 4 * 3
    assert max(guided) == 12


def test_guided_search_keeps_the_best_caption_that_already_says_the_words(decoder):
    """Where plain beam search's best caption already says a required word, requiring it
    returns that caption."""
    regions, pooled = _images(24, seed=17)
    plain = _run(decoder, regions, pooled, num_beams=3)
    constraints = [[(r[0].tokens[len(r[0].tokens) // 2],)] if r[0].tokens else [] for r in plain]
    guided = generate(decoder, regions, pooled, DecodeConfig(num_beams=3), constraints=constraints, **SPECIAL)
    assert [g[0].tokens for g in guided] == [p[0].tokens for p in plain]


def test_beam_allocation_guarantees_each_bank_its_share():
    from captioner.decoding import NEG_INF, _allocate, _bank_quotas

    assert [_bank_quotas(3, 2), _bank_quotas(3, 1), _bank_quotas(4, 3)] == [[2, 1], [3], [2, 1, 1]]
    # bank 1's only candidate is the worst: it still gets its row
    assert sorted(_allocate([-1.0, -2.0, -3.0, -9.0, NEG_INF], [0, 0, 0, 1, 1], [2, 1], 4)[:3]) == [0, 1, 3]
    assert sorted(_allocate([-1.0, -2.0, -3.0, -4.0, -0.5], [0, 0, 0, 0, 0], [3], 4)[:3]) == [0, 1, 4]
    # bank 2 is empty: its row goes to the best other
    assert sorted(_allocate([-1.0, -2.0, -3.0, -9.0, -8.0], [0, 0, 0, 1, 0], [2, 1, 1], 4)) == [0, 1, 2, 3]
    # guaranteed rows first, each part best first; on equal log-probs the earlier candidate
    assert _allocate([-2.0, -1.0, -1.0, -5.0], [0, 0, 0, 1], [1, 1], 4) == [1, 3, 2, 0]


@pytest.mark.parametrize("options", [dict(num_beams=3, num_return_sequences=2), dict(num_beams=1),
                                     dict(num_beams=1, do_sample=True, seed=0, num_return_sequences=2)])
def test_hidden_states_are_the_states_that_chose_each_word(decoder, options):
    """output_hidden_states: for each returned sequence, the top layer's h, c and gates at every
    word (then <eos>), equal to a teacher-forced rerun of that sequence; absent when not asked."""
    regions, pooled = _images(3, seed=18)
    results = _run(decoder, regions, pooled, output_hidden_states=True, **options)
    for image, hyps in enumerate(results):
        for h in hyps:
            steps = len(h.token_log_probs)
            assert set(h.hidden_states) == {"h", "c", "gates"}
            assert h.hidden_states["h"].shape == h.hidden_states["c"].shape == (steps, decoder.config.hidden_dim)
            assert h.hidden_states["gates"].shape == (steps, 4, decoder.config.hidden_dim)
            with torch.inference_mode():
                state = decoder.init_state(regions[image:image + 1], pooled[image:image + 1])
                inputs = [SPECIAL["bos_id"]] + h.tokens
                for t in range(steps):
                    _, state, _ = decoder.step(torch.tensor([inputs[t]]), state)
                    assert torch.allclose(h.hidden_states["h"][t], state.h[-1, 0], atol=1e-5)
                    assert torch.allclose(h.hidden_states["c"][t], state.c[-1, 0], atol=1e-5)
    assert all(h.hidden_states is None for r in _run(decoder, regions, pooled, **options) for h in r)


def test_scores_rank_as_fp32_tensors_do():
    """Beam search ranks hypotheses by scores computed in Python, as fp32 tensors compute them
    (the divisor length ** penalty rounded to fp32 first): log-probs one fp32 step apart keep
    their order."""
    from captioner.decoding import _score32

    for penalty in (0.0, 0.5, 0.7, 1.0, 2.0):
        for length in range(1, 20):
            for x in torch.linspace(-30.0, -0.01, 97).tolist():
                assert _score32(x, length, penalty) == (torch.tensor([x]) / length ** penalty).item()
    better, worse = -6.928203105926514, -6.928203582763672  # adjacent fp32 values
    assert _score32(better, 3, 0.5) > _score32(worse, 3, 0.5)


def test_beam_search_with_fewer_words_than_candidates(decoder):
    """A vocabulary smaller than the 2K candidates a step takes per row still gives captions,
    with and without required words."""
    small = Decoder(tiny_decoder_config(8)).eval()
    regions, pooled = _images(3, seed=19)
    for constraints in (None, [[(4,)], [], [(5,), (6,)]]):
        results = generate(small, regions, pooled, DecodeConfig(num_beams=5, max_new_tokens=6),
                           constraints=constraints, **SPECIAL)
        assert [len(r) for r in results] == [1, 1, 1]
        for r in results:
            assert not set(r[0].tokens) & set(SPECIAL["banned_ids"]) and SPECIAL["eos_id"] not in r[0].tokens

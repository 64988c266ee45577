"""Decoding: greedy, sampling and beam search, batched over images and beams.

All methods talk to the decoder only through `init_state` / `step` / `DecoderState`, so a fix
lands once. Parameter names follow Hugging Face `generate`.

Shapes: B images, K beams (or samples) per image, N = B*K, V vocabulary, T generated tokens,
P regions, R returned sequences per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .decode_config import MAX_CONSTRAINTS, DecodeConfig
from .decoder import Decoder, DecoderState

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One generated sequence. `tokens` excludes <eos>; `token_log_probs` has one entry per token
    plus one for <eos> when `finished`; `attention` is (len(token_log_probs), P) or None."""

    tokens: list[int]
    token_log_probs: list[float]
    log_prob: float
    score: float  # log_prob / length ** length_penalty, the ranking score
    finished: bool
    attention: torch.Tensor | None = field(default=None, repr=False)


def generate(
    decoder: Decoder,
    regions: torch.Tensor,
    pooled: torch.Tensor,
    config: DecodeConfig,
    *,
    bos_id: int,
    eos_id: int,
    banned_ids: tuple[int, ...] = (),
    best_first: bool = True,
    constraints: Sequence[Sequence[Sequence[int]]] | None = None,
    excluded: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Caption a batch of encoded images: regions (B, P, E), pooled (B, E) -> for each image,
    `num_return_sequences` hypotheses, best first. `banned_ids` (<pad>, <bos>, <unk>) are never
    generated. `best_first=False` leaves sampled sequences in the order of their rows, image by
    image (self-critical training replays those rows' dropout masks). `constraints[b]`: image b's
    required words, each a sequence of word ids of which one must appear (a word's forms);
    `excluded[b]`: word ids image b's captions must not say. Both need search (constrained beam
    search, with one beam per state when num_beams is 1)."""
    rules = _Rules(config, eos_id, banned_ids)
    required = None
    if constraints is not None or excluded is not None:
        for given in (constraints, excluded):
            if given is not None and len(given) != regions.shape[0]:
                raise ValueError(f"constraints for {len(given)} images, but {regions.shape[0]} images")
        required = _Constraints.build(constraints or [[]] * regions.shape[0], excluded, decoder.config.vocab_size)
        if required is not None and config.do_sample:
            raise ValueError("required words need search: they do not combine with do_sample=True")
    with torch.inference_mode():  # less per-op overhead than no_grad: decoding is many small ops
        state = decoder.init_state(regions, pooled)
        if config.num_beams > 1 or required is not None:
            results = _beam_search(decoder, state, bos_id, rules, required)
        else:
            results = _sample(decoder, state, bos_id, rules)
    for hypotheses in results:
        if best_first:
            hypotheses.sort(key=lambda h: h.score, reverse=True)
        for h in hypotheses:  # hand out ordinary tensors, which callers may modify in place
            h.attention = None if h.attention is None else h.attention.clone()
    return results


@dataclass
class _Rules:
    config: DecodeConfig
    eos: int
    banned: tuple[int, ...]

    def __post_init__(self) -> None:
        self.banned_index = torch.tensor(self.banned, dtype=torch.long)

    def log_probs(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """logits (N, V), history (N, t) generated so far -> (N, V) log-probs, -inf where banned:
        special tokens, <eos> before min_new_tokens, tokens that would repeat an n-gram."""
        logp = logits.float().log_softmax(dim=-1)
        # Each step bans at most one word per n-gram seen so far, so only a vocabulary that small
        # can run out of words: then <eos> stays allowed and the caption ends.
        may_run_out = logp.shape[1] - len(self.banned) <= history.shape[1] + 2
        eos_logp = logp[:, self.eos].clone() if may_run_out else None
        if self.banned:
            logp.index_fill_(1, self.banned_index.to(logp.device), NEG_INF)
        if history.shape[1] < self.config.min_new_tokens:
            logp[:, self.eos] = NEG_INF
        n = self.config.no_repeat_ngram_size
        if n == 1 and history.shape[1]:
            logp.scatter_(1, history, NEG_INF)
        elif n > 1 and history.shape[1] >= n:
            windows = history.unfold(1, n, 1)  # (N, W, n): every n-gram so far
            suffix = history[:, history.shape[1] - n + 1:]  # (N, n-1)
            seen = (windows[:, :, :-1] == suffix[:, None]).all(dim=-1)  # (N, W)
            penalty = torch.zeros(seen.shape, dtype=logp.dtype, device=logp.device).masked_fill_(seen, NEG_INF)
            logp.scatter_add_(1, windows[:, :, -1], penalty)
        if may_run_out:
            stuck = torch.isinf(logp).all(dim=-1)
            logp[stuck, self.eos] = eos_logp[stuck]
        return logp

    def score(self, log_prob: torch.Tensor, length: int | torch.Tensor) -> torch.Tensor:
        penalty = self.config.length_penalty
        if penalty == 0:
            return log_prob
        if not isinstance(length, torch.Tensor):
            length = torch.tensor(float(length), device=log_prob.device)
        return log_prob / length.to(log_prob.dtype).clamp(min=1) ** penalty


def _hypothesis(tokens: torch.Tensor, logps: torch.Tensor, attention, length: int, finished: bool,
                penalty: float) -> Hypothesis:
    """Row of generated ids (length of them valid, the last being <eos> when finished)."""
    token_logps = logps[:length].tolist()
    log_prob = float(sum(token_logps))
    words = tokens[: length - 1 if finished else length].tolist()
    score = log_prob / max(length, 1) ** penalty if penalty else log_prob
    return Hypothesis(words, token_logps, log_prob, score, finished,
                      None if attention is None else attention[:length].clone())


# -- greedy and sampling -----------------------------------------------------------------------

def _sample(decoder: Decoder, state: DecoderState, bos: int, rules: _Rules) -> list[list[Hypothesis]]:
    config = rules.config
    b, k = state.image_gates.shape[0], config.num_return_sequences
    state = state.repeat(k) if k > 1 else state
    n, device = b * k, state.h.device
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    tokens = torch.full((n,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    history = torch.empty(n, 0, dtype=torch.long, device=device)
    step_logps, alphas = [], []
    for _ in range(config.max_new_tokens):
        logits, state, alpha = decoder.step(tokens, state)
        logp = rules.log_probs(logits, history)  # (N, V)
        tokens = _draw(logp, config, generator) if config.do_sample else logp.argmax(dim=-1)
        tokens = tokens.masked_fill(finished, rules.eos)  # finished rows idle on <eos>
        step_logps.append(logp.gather(1, tokens[:, None]).squeeze(1).masked_fill(finished, 0.0))
        if config.return_attention and alpha is not None:
            alphas.append(alpha)
        length += (~finished).long()
        history = torch.cat([history, tokens[:, None]], dim=1)
        finished |= tokens == rules.eos
        if bool(finished.all()):
            break
    token_logps = torch.stack(step_logps, dim=1).cpu()  # (N, T)
    attention = torch.stack(alphas, dim=1).cpu() if alphas else None  # (N, T, P)
    history, length, finished = history.cpu(), length.tolist(), finished.tolist()
    results = []
    for image in range(b):
        hyps = [_hypothesis(history[row], token_logps[row], None if attention is None else attention[row],
                            length[row], finished[row], config.length_penalty)
                for row in range(image * k, image * k + k)]
        results.append(hyps)
    return results


def _draw(logp: torch.Tensor, config: DecodeConfig, generator) -> torch.Tensor:
    """Sample (N,) tokens from temperature / top-k / top-p filtered log-probs (N, V); tokens
    banned in `logp` (-inf) stay banned. Log-probs differ from the logits by a constant per row,
    so every filter and the softmax see the same scores without masking the bans again."""
    scores = logp if config.temperature == 1.0 else logp / config.temperature
    if config.top_k:
        kth = scores.topk(min(config.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p  # keeps the token that crosses p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, NEG_INF))
    return _categorical((scores - scores.amax(dim=-1, keepdim=True)).exp(), generator)


def _categorical(weights: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of (N, V) non-negative weights (unnormalised), by inverting the
    cumulative sum: one uniform number per row, where `torch.multinomial` on CPUs draws one per
    weight (with the softmax, 16.7 against 3.1 ms for 160 x 3,918 on 2 cores; it was most of
    self-critical sampling)."""
    cumulative = weights.double().cumsum(dim=-1)  # float64: 3,918 partial sums stay exact enough
    total = cumulative[:, -1:]
    u = torch.rand(total.shape, dtype=total.dtype, device=total.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total, even after rounding
    # The first index whose partial sum exceeds u: its own weight is positive, so a banned
    # (zero-weight) word is never drawn.
    return torch.searchsorted(cumulative, u, right=True).squeeze(1)


# -- beam search -------------------------------------------------------------------------------

class _Pool:
    """The best finished (or, at the end, truncated) hypotheses of every image, S = slots."""

    def __init__(self, images: int, slots: int, max_len: int, regions: int | None, device):
        self.score = torch.full((images, slots), NEG_INF, device=device)
        self.tokens = torch.full((images, slots, max_len), -1, dtype=torch.long, device=device)
        self.logps = torch.zeros(images, slots, max_len, device=device)
        self.length = torch.zeros(images, slots, dtype=torch.long, device=device)
        self.finished = torch.zeros(images, slots, dtype=torch.bool, device=device)
        self.alpha = None if regions is None else torch.zeros(images, slots, max_len, regions, device=device)

    def merge(self, images, score, tokens, logps, alpha, length: int, finished: bool) -> None:
        """Offer C candidates for each of the given images: score (B, C), tokens and logps
        (B, C, t), alpha (B, C, t, P); keep the best S per image."""
        b, slots, max_len = images.shape[0], self.score.shape[1], self.tokens.shape[2]
        merged, keep = torch.cat([self.score[images], score], dim=1).topk(slots, dim=1)  # (B, S)

        def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            if new.dim() > 2 and new.shape[2] < max_len:  # pad the time axis
                pad = new.new_full((*new.shape[:2], max_len - new.shape[2], *new.shape[3:]), 0)
                new = torch.cat([new, pad], dim=2)
            both = torch.cat([old, new], dim=1)
            index = keep.view(b, slots, *[1] * (both.dim() - 2)).expand(b, slots, *both.shape[2:])
            return both.gather(1, index)

        c = score.shape[1]
        self.score[images] = merged
        self.tokens[images] = pick(self.tokens[images], tokens)
        self.logps[images] = pick(self.logps[images], logps)
        self.length[images] = pick(self.length[images], torch.full((b, c), length, device=score.device))
        self.finished[images] = pick(self.finished[images], torch.full((b, c), finished, device=score.device))
        if self.alpha is not None:
            self.alpha[images] = pick(self.alpha[images], alpha)

    def results(self, count: int, penalty: float) -> list[list[Hypothesis]]:
        score, tokens, logps = self.score.cpu(), self.tokens.cpu(), self.logps.cpu()
        length, finished = self.length.tolist(), self.finished.tolist()
        alpha = None if self.alpha is None else self.alpha.cpu()
        return [
            [_hypothesis(tokens[i, s], logps[i, s], None if alpha is None else alpha[i, s],
                         length[i][s], finished[i][s], penalty)
             for s in range(count) if score[i, s] > NEG_INF]
            for i in range(score.shape[0])
        ]


def _beam_search(decoder: Decoder, state: DecoderState, bos: int, rules: _Rules,
                 constraints: "_Constraints | None" = None) -> list[list[Hypothesis]]:
    """Vectorised beam search with a pool of finished hypotheses per image, as in Hugging Face
    `generate`: each step takes the top 2K of the K*V candidates; an <eos> among the first K
    enters the pool, the best K others continue. An image is done when its pool is full (and,
    without `early_stopping`, no live beam can beat the pool's worst); done images leave the
    batch, so an image's result never depends on the others. After `max_new_tokens` the live
    beams join the pool unfinished, so every image gets a caption even when no beam finished.

    Required words (constrained beam search, Anderson et al. 2017): with C constraints each image
    keeps K beams in each of S = 2^C states, the set of constraints met so far. A candidate moves
    to the state of its beam plus the constraints its word meets; every state keeps its own best
    K, and only beams that met every constraint may end. Without constraints S = 1 and this is
    plain beam search."""
    config = rules.config
    b_all, k = state.image_gates.shape[0], config.num_beams
    device, vocab = state.h.device, decoder.config.vocab_size
    s = 1 if constraints is None else constraints.states  # S
    r = s * k  # R rows per image: beams of state 0, then of state 1, ...
    want_alpha = config.return_attention and decoder.config.attention
    regions = state.memory.shape[1] if want_alpha else None
    pool = _Pool(b_all, max(k, config.num_return_sequences), config.max_new_tokens, regions, device)

    active = torch.arange(b_all, device=device)  # original index of each image still searching
    state = state.repeat(r)
    beam_logp = torch.full((b_all, s, k), NEG_INF, device=device)
    beam_logp[:, 0, 0] = 0.0  # every image starts with one beam, in state 0 (nothing met yet)
    history = torch.empty(b_all, r, 0, dtype=torch.long, device=device)  # (B, R, t)
    history_logps = torch.empty(b_all, r, 0, device=device)
    history_alpha = torch.empty(b_all, r, 0, regions, device=device) if want_alpha else None
    tokens = torch.full((b_all * r,), bos, dtype=torch.long, device=device)
    first_rows = torch.arange(b_all, device=device)[:, None, None] * r  # (B, 1, 1) first row of each image
    among_first_k = torch.arange(2 * k, device=device) < k  # (2K,)
    row_state = torch.arange(s, device=device).repeat_interleave(k)  # (R,) the state of each row
    goal = (torch.zeros(b_all, dtype=torch.long, device=device) if constraints is None
            else constraints.goal.to(device))  # (B,) the state with every constraint met, of each active image
    required_words = None if constraints is None else constraints.required_words(device)
    banned = None if constraints is None or constraints.banned is None else constraints.banned.to(device)  # (B, V)

    for step in range(config.max_new_tokens):
        b = active.shape[0]
        image_rows = first_rows[:b]
        logits, state, alpha = decoder.step(tokens, state)
        logp = rules.log_probs(logits, history.view(b * r, -1)).view(b, r, vocab)  # (B, R, V)
        if banned is not None:
            logp.masked_fill_(banned[:, None], NEG_INF)
        if s > 1:  # only beams that met every constraint may end
            logp[:, :, rules.eos].masked_fill_(row_state[None] != goal[:, None], NEG_INF)
        candidates = beam_logp.view(b, r, 1) + logp  # (B, R, V)
        if s == 1:
            top_logp, top_index = candidates.view(b, 1, r * vocab).topk(2 * k, dim=2)  # (B, 1, 2K)
        else:
            top_logp, top_index = _state_top(candidates, row_state, s, required_words, 2 * k)  # (B, S, 2K)
        origin = torch.div(top_index, vocab, rounding_mode="floor")  # row (within the image) each extends
        word = top_index % vocab
        word_logp = logp.view(b * r, vocab)[(image_rows + origin).view(-1), word.view(-1)].view(b, s, 2 * k)
        is_eos = (word == rules.eos) & (top_logp > NEG_INF)

        def extend(rows: torch.Tensor, new_word: torch.Tensor, new_logp: torch.Tensor):
            """Histories of candidates: rows (B, C) of the flat (N, ...) beams + their last step."""
            c = rows.shape[1]
            flat = rows.reshape(-1)
            grown = (
                torch.cat([history.view(b * r, -1)[flat].view(b, c, -1), new_word.reshape(b, c, 1)], dim=2),
                torch.cat([history_logps.view(b * r, -1)[flat].view(b, c, -1), new_logp.reshape(b, c, 1)], dim=2),
            )
            if not want_alpha:
                return (*grown, None)
            past = history_alpha.view(b * r, *history_alpha.shape[2:])[flat].view(b, c, -1, regions)
            return (*grown, torch.cat([past, alpha[flat].view(b, c, 1, regions)], dim=2))

        # 1) An <eos> among the goal state's first K candidates finishes a hypothesis.
        at_goal = goal.view(b, 1, 1).expand(b, 1, 2 * k) if s > 1 else None

        def goal_of(t: torch.Tensor) -> torch.Tensor:  # (B, S, 2K) -> (B, 2K): the goal state's
            return t[:, 0] if s == 1 else t.gather(1, at_goal).squeeze(1)

        enters = goal_of(is_eos) & among_first_k
        if bool(enters.any()):
            eos_tokens, eos_logps, eos_alpha = extend(image_rows[:, 0] + goal_of(origin), goal_of(word),
                                                      goal_of(word_logp))
            pool.merge(active, rules.score(goal_of(top_logp), step + 1).masked_fill(~enters, NEG_INF),
                       eos_tokens, eos_logps, eos_alpha, length=step + 1, finished=True)

        # 2) The best K other candidates of each state continue.
        beam_logp, live = top_logp.masked_fill(is_eos, NEG_INF).topk(k, dim=2)  # (B, S, K)
        rows = (image_rows + origin.gather(2, live)).view(b, r)  # (B, R)
        live_words = word.gather(2, live).view(b, r)
        tokens = live_words.view(-1)
        history, history_logps, history_alpha = extend(rows, live_words, word_logp.gather(2, live).view(b, r))
        state = state.reorder(rows.view(-1))

        # 3) Done images leave the batch: with early_stopping as soon as their pool is full, else
        #    when no live beam can still beat the pool's worst (Hugging Face's heuristic).
        worst_kept = pool.score[active, -1]
        done = worst_kept > NEG_INF
        if not config.early_stopping:
            best_live = beam_logp.view(b, r).max(dim=1).values
            done &= (worst_kept >= rules.score(best_live, step + 1)) | (best_live == NEG_INF)
        if bool(done.any()):
            stay = (~done).nonzero().squeeze(1)
            if stay.numel() == 0:
                return pool.results(config.num_return_sequences, config.length_penalty)
            active, state = active[stay], state.select_images(stay)
            beam_logp, history, history_logps = beam_logp[stay], history[stay], history_logps[stay]
            history_alpha = None if history_alpha is None else history_alpha[stay]
            tokens = tokens.view(-1, r)[stay].view(-1)
            goal = goal[stay]
            required_words = None if required_words is None else required_words.select(stay)
            banned = None if banned is None else banned[stay]

    # max_new_tokens reached: the live beams at the goal compete unfinished; an image none of
    # whose beams met every constraint keeps its best beams of any state.
    b = active.shape[0]
    final_logp = beam_logp.view(b, r)
    if s > 1:
        reached = row_state[None] == goal[:, None]  # (B, R)
        fallback = ~(reached & (final_logp > NEG_INF)).any(dim=1, keepdim=True)
        final_logp = final_logp.masked_fill(~reached & ~fallback, NEG_INF)
    pool.merge(active, rules.score(final_logp, config.max_new_tokens), history, history_logps, history_alpha,
               length=config.max_new_tokens, finished=False)
    return pool.results(config.num_return_sequences, config.length_penalty)


@dataclass
class _RequiredWords:
    """The words that meet some constraint, per image: mask (B, V) True for them; ids and bits
    (B, W): their word ids and constraint bits, padded with bits 0 (W = the most of any image)."""

    mask: torch.Tensor
    ids: torch.Tensor
    bits: torch.Tensor

    def select(self, images: torch.Tensor) -> "_RequiredWords":
        return _RequiredWords(self.mask[images], self.ids[images], self.bits[images])


def _state_top(candidates: torch.Tensor, row_state: torch.Tensor, s: int, required: _RequiredWords,
               count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `count` candidates moving into each of the S = `s` states: candidates (B, R, V)
    with R = S*K rows, state-major (`row_state` (R,) the state of each row) -> log-probs and flat
    indices row*V + word, each (B, S, count). A word
    that meets no constraint keeps its row's state, so a state's other words come from its own
    K rows (one top-k over (B, S, K*V), no (B, S, R, V) mask); the few required words, from any
    row whose state plus their bits is that state."""
    b, r, vocab = candidates.shape
    k = r // s
    plain = candidates.view(b, s, k, vocab).masked_fill(required.mask[:, None, None], NEG_INF)
    plain_logp, plain_index = plain.view(b, s, k * vocab).topk(count, dim=2)
    plain_index = plain_index + (torch.arange(s, device=candidates.device) * k * vocab)[None, :, None]
    w = required.ids.shape[1]
    said = candidates.gather(2, required.ids[:, None].expand(b, r, w))  # (B, R, W)
    target = row_state[None, :, None] | required.bits[:, None]  # (B, R, W) the state each one moves to
    states = torch.arange(s, device=candidates.device).view(1, s, 1, 1)
    outside = (target[:, None] != states) | (required.bits == 0)[:, None, None]  # padding moves nowhere
    said_logp, said_index = said[:, None].masked_fill(outside, NEG_INF).view(b, s, r * w).topk(min(count, r * w), dim=2)
    said_word = required.ids.gather(1, (said_index % w).view(b, -1)).view(b, s, -1)
    said_index = torch.div(said_index, w, rounding_mode="floor") * vocab + said_word  # row*V + word
    both_logp, pick = torch.cat([plain_logp, said_logp], dim=2).topk(count, dim=2)
    return both_logp, torch.cat([plain_index, said_index], dim=2).gather(2, pick)


@dataclass
class _Constraints:
    """Required and excluded words of a batch: image b must say, for each of its constraints, one
    of that constraint's word ids, and none of its excluded ids. word_bits (B, V): bit c set where
    a word meets constraint c; goal (B,): the bits of all of an image's constraints; states = 2^C
    for the most constrained image; banned (B, V) or None: the excluded words."""

    word_bits: torch.Tensor
    goal: torch.Tensor
    states: int
    banned: torch.Tensor | None = None

    @classmethod
    def build(cls, constraints: Sequence[Sequence[Sequence[int]]], excluded: Sequence[Sequence[int]] | None,
              vocab_size: int) -> "_Constraints | None":
        """constraints[b] = image b's constraints, each a sequence of word ids (its forms);
        excluded[b] = the ids image b must not say."""
        most = max((len(c) for c in constraints), default=0)
        if most > MAX_CONSTRAINTS:
            raise ValueError(f"at most {MAX_CONSTRAINTS} required words per image, got {most}")
        check = lambda i: int(i) if 0 <= int(i) < vocab_size else _outside(i)  # noqa: E731
        bits = torch.zeros(len(constraints), vocab_size, dtype=torch.long)
        goal = torch.zeros(len(constraints), dtype=torch.long)
        for image, required in enumerate(constraints):
            for c, ids in enumerate(required):
                for i in ids:
                    bits[image, check(i)] |= 1 << c
                goal[image] |= 1 << c
        banned = None
        if excluded is not None and any(excluded):
            banned = torch.zeros(len(excluded), vocab_size, dtype=torch.bool)
            for image, ids in enumerate(excluded):
                banned[image, [check(i) for i in ids]] = True
            if bool((banned & (bits > 0)).any()):
                raise ValueError("a word cannot be both required and excluded")
        if most == 0 and banned is None:
            return None
        return cls(bits, goal, 1 << most, banned)

    def required_words(self, device) -> _RequiredWords:
        mask = self.word_bits > 0
        bits, ids = self.word_bits.topk(max(1, int(mask.sum(dim=1).max())), dim=1)  # (B, W), padding last
        return _RequiredWords(mask.to(device), ids.to(device), bits.to(device))


def _outside(i) -> int:
    raise ValueError(f"required or excluded word id {i} is outside the vocabulary")

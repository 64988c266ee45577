"""Decoding: greedy, sampling and beam search, batched over images and beams.

Every method talks to the decoder only through `init_state` / `step` / `DecoderState`, and
applies the same list of token rules (`TokenRule`, in the spirit of Hugging Face's logits
processors), each of which bans words per row in one mask. A hypothesis is ranked by `score`,
written once. Beam search is a loop over the named steps of one `BeamState`: select candidates,
finish the ones that end, advance the others, drop the images that are done.

Shapes: B images, K beams (or samples) per image, R rows per image (K, or more with required
words), N = B*R rows, V vocabulary, T generated tokens, P regions, H hypotheses kept per image
(the pool), Q candidates per image in one step, C required words per image, W words that meet
some required word (per image, padded).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .decode_config import MAX_CONSTRAINTS, DecodeConfig
from .decoder import Decoder, DecoderState

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One generated sequence. `tokens` excludes <eos>; `token_log_probs` has one entry per token
    plus one for <eos> when `finished`, T' of them. Asked for: `attention` (T', P), and
    `hidden_states`, the top layer's state after each step: "h" and "c" (T', D), and where the
    decoder records them (PyTorch), "gates" (T', 4, D): i, f, g, o."""

    tokens: list[int]
    token_log_probs: list[float]
    log_prob: float
    score: float  # see `score`
    finished: bool
    attention: torch.Tensor | None = field(default=None, repr=False)
    hidden_states: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _trace(config: DecodeConfig, state: DecoderState, alpha: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What this step records of each row, as asked: attention (N, P), h and c (N, D) of the top
    layer, gates (N, 4, D)."""
    trace = {}
    if config.return_attention and alpha is not None:
        trace["attention"] = alpha
    if config.output_hidden_states:
        trace["h"] = state.h[-1]
        if state.c is not None:
            trace["c"] = state.c[-1]
        if state.gates is not None:
            trace["gates"] = state.gates
    return trace


def score(log_prob, length: int, length_penalty: float):
    """The ranking score of a hypothesis of `length` tokens (<eos> included): log_prob /
    length ** length_penalty; 0 ranks by log_prob. log_prob: a float or a tensor."""
    return log_prob / max(length, 1) ** length_penalty if length_penalty else log_prob


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
    search, with C + 1 beams for C required words when num_beams is smaller)."""
    guide = None
    if constraints is not None or excluded is not None:
        for given in (constraints, excluded):
            if given is not None and len(given) != regions.shape[0]:
                raise ValueError(f"constraints for {len(given)} images, but {regions.shape[0]} images")
        guide = _Constraints.build(constraints or [[]] * regions.shape[0], excluded, decoder.config.vocab_size)
        if guide is not None and config.do_sample:
            raise ValueError("required words need search: they do not combine with do_sample=True")
    rules = token_rules(config, eos_id, banned_ids, decoder.config.vocab_size)
    with torch.inference_mode():  # less per-op overhead than no_grad: decoding is many small ops
        state = decoder.init_state(regions, pooled,
                                   record_gates=config.output_hidden_states and decoder.can_record_gates)
        if config.num_beams > 1 or guide is not None:
            results = _beam_search(decoder, state, bos_id, eos_id, rules, config, guide)
        else:
            results = _sample(decoder, state, bos_id, eos_id, rules, config)
    for hypotheses in results:
        if best_first:
            hypotheses.sort(key=lambda h: h.score, reverse=True)
        for h in hypotheses:  # hand out ordinary tensors, which callers may modify in place
            h.attention = None if h.attention is None else h.attention.clone()
            if h.hidden_states is not None:
                h.hidden_states = {name: t.clone() for name, t in h.hidden_states.items()}
    return results


# -- token rules -------------------------------------------------------------------------------

@dataclass
class Rows:
    """What a rule may need to know of each row (N,): its image's index in the batch as given,
    and, in constrained search, the constraint bits the row has met and its image's goal."""

    image: torch.Tensor
    met: torch.Tensor | None = None
    goal: torch.Tensor | None = None


class TokenRule:
    """One rule over the next word: `__call__(ban, history, rows)` updates ban (N, V), True where
    a row may not say a word, from history (N, t), the words generated so far. Rules run in list
    order; a later rule sees (and, where it `lifts`, may lift) an earlier one's bans. A `fixed`
    rule bans the same words for every row of an image at every step, so `Bans` can apply it once."""

    fixed = False  # the same bans for every row of an image, at every step
    lifts = False  # may lift an earlier rule's ban

    def __call__(self, ban: torch.Tensor, history: torch.Tensor, rows: Rows) -> None:
        raise NotImplementedError


@dataclass
class BanTokens(TokenRule):
    ids: tuple[int, ...]  # special tokens: <pad>, <bos>, <unk>
    fixed = True

    def __post_init__(self) -> None:
        self.index = torch.tensor(self.ids, dtype=torch.long)

    def __call__(self, ban, history, rows):
        ban.index_fill_(1, self.index.to(ban.device), True)


@dataclass
class MinLength(TokenRule):
    eos: int
    min_new_tokens: int

    def __call__(self, ban, history, rows):
        if history.shape[1] < self.min_new_tokens:
            ban[:, self.eos] = True


@dataclass
class NoRepeatNgram(TokenRule):
    n: int  # never say an n-gram a row has said

    def __call__(self, ban, history, rows):
        n = self.n
        if n == 1 and history.shape[1]:
            ban.scatter_(1, history, True)
        elif n > 1 and history.shape[1] >= n:
            windows = history.unfold(1, n, 1)  # (N, T-n+1, n): every n-gram so far
            suffix = history[:, history.shape[1] - n + 1:]  # (N, n-1)
            seen = (windows[:, :, :-1] == suffix[:, None]).all(dim=-1)  # (N, T-n+1)
            ban.scatter_add_(1, windows[:, :, -1], seen)  # bool add: or


@dataclass
class EndWhenStuck(TokenRule):
    """A row the rules before leave no word may end (a vocabulary as small as the words said)."""

    eos: int
    lifts = True

    def __call__(self, ban, history, rows):
        ban[ban.all(dim=1), self.eos] = False


@dataclass
class ExcludeWords(TokenRule):
    banned: torch.Tensor  # (B, V) True where an image's captions must not say a word
    fixed = True

    def __call__(self, ban, history, rows):
        ban |= self.banned[rows.image]


@dataclass
class EndWhenMet(TokenRule):
    """Only a row that met every constraint of its image may end."""

    eos: int

    def __call__(self, ban, history, rows):
        ban.select(1, self.eos).logical_or_(rows.met != rows.goal)  # in place, through the view


def token_rules(config: DecodeConfig, eos: int, banned_ids: tuple[int, ...], vocab_size: int) -> list[TokenRule]:
    """The rules every decoding method applies; constrained search adds its own after them."""
    rules: list[TokenRule] = [BanTokens(tuple(banned_ids))] if banned_ids else []
    if config.min_new_tokens:
        rules.append(MinLength(eos, config.min_new_tokens))
    if config.no_repeat_ngram_size:
        rules.append(NoRepeatNgram(config.no_repeat_ngram_size))
    # Each step bans at most one word per n-gram said, and <eos> early: only a vocabulary about
    # as small as a caption is long can run out of words.
    if vocab_size - len(banned_ids) <= config.max_new_tokens + 2:
        rules.append(EndWhenStuck(eos))
    return rules


class Bans:
    """The token rules of one decoding of B images over V words, in list order. The fixed rules
    before any rule that lifts bans are applied once, to a (B, V) mask that each step's rows
    copy; the rest at every step."""

    def __init__(self, rules: Sequence[TokenRule], images: int, vocab_size: int, device):
        self.per_image = torch.zeros(images, vocab_size, dtype=torch.bool, device=device)  # (B, V)
        every_image = Rows(image=torch.arange(images, device=device))
        self.each_step: list[TokenRule] = []
        for rule in rules:
            if rule.fixed and not any(r.lifts for r in self.each_step):
                rule(self.per_image, torch.empty(images, 0, dtype=torch.long, device=device), every_image)
            else:
                self.each_step.append(rule)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows' images (N,), their mask (N, V))

    def log_probs(self, logits: torch.Tensor, history: torch.Tensor, rows: Rows) -> torch.Tensor:
        """logits (N, V), history (N, t) -> log-probs (N, V), -inf where a rule bans the word."""
        if self._rows is None or self._rows[0] is not rows.image:  # the rows change when images leave
            self._rows = rows.image, self.per_image.index_select(0, rows.image)
        ban = self._rows[1].clone() if self.each_step else self._rows[1]
        for rule in self.each_step:
            rule(ban, history, rows)
        return logits.log_softmax(dim=-1, dtype=torch.float32).masked_fill_(ban, NEG_INF)


def _hypothesis(tokens: list[int], logps: list[float], traces: dict[str, torch.Tensor], length: int,
                finished: bool, penalty: float) -> Hypothesis:
    """Generated ids (length of them valid, the last being <eos> when finished), their log-probs
    and traces (T, *X) each, kept as views: `generate` hands out copies."""
    token_logps = logps[:length]
    log_prob = float(sum(token_logps))
    words = tokens[: length - 1 if finished else length]
    kept = {name: t[:length] for name, t in traces.items()}
    attention = kept.pop("attention", None)
    return Hypothesis(words, token_logps, log_prob, score(log_prob, length, penalty), finished, attention,
                      kept or None)


# -- greedy and sampling -----------------------------------------------------------------------

def _sample(decoder: Decoder, state: DecoderState, bos: int, eos: int, rules: list[TokenRule],
            config: DecodeConfig) -> list[list[Hypothesis]]:
    b, k = state.image_gates.shape[0], config.num_return_sequences
    state = state.repeat(k) if k > 1 else state
    n, device = b * k, state.h.device
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    rows = Rows(image=torch.arange(b, device=device).repeat_interleave(k))
    bans = Bans(rules, b, decoder.config.vocab_size, device)
    tokens = torch.full((n,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    history = torch.empty(n, 0, dtype=torch.long, device=device)
    step_logps, traces = [], {}
    for _ in range(config.max_new_tokens):
        logits, state, alpha = decoder.step(tokens, state)
        logp = bans.log_probs(logits, history, rows)  # (N, V)
        tokens = _draw(logp, config, generator) if config.do_sample else logp.argmax(dim=-1)
        tokens = tokens.masked_fill(finished, eos)  # finished rows idle on <eos>
        step_logps.append(logp.gather(1, tokens[:, None]).squeeze(1).masked_fill(finished, 0.0))
        for name, value in _trace(config, state, alpha).items():
            traces.setdefault(name, []).append(value)
        length += (~finished).long()
        history = torch.cat([history, tokens[:, None]], dim=1)
        finished |= tokens == eos
        if bool(finished.all()):
            break
    token_logps = torch.stack(step_logps, dim=1).cpu()  # (N, T)
    stacked = {name: torch.stack(values, dim=1).cpu() for name, values in traces.items()}  # (N, T, *X) each
    history, token_logps, length, finished = history.tolist(), token_logps.tolist(), length.tolist(), finished.tolist()
    return [[_hypothesis(history[row], token_logps[row], {name: t[row] for name, t in stacked.items()},
                         length[row], finished[row], config.length_penalty)
             for row in range(image * k, image * k + k)]
            for image in range(b)]


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
    """The best finished (or, at the end, truncated) hypotheses of every image, at most H = slots
    each, best first. Kept as Python objects: few hypotheses end per step, and a tensor pool
    costs dozens of small operations per merge."""

    def __init__(self, images: int, slots: int, penalty: float):
        self.slots, self.penalty = slots, penalty
        self.kept: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(images)]  # (ranking score, hypothesis)

    def worst(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) the score an image's pool would drop next (-inf while it has a free slot)."""
        kept = [self.kept[i] for i in images.tolist()]
        return torch.tensor([k[-1][0] if len(k) == self.slots else NEG_INF for k in kept], device=images.device)

    def merge(self, images, score, tokens, logps, traces: dict[str, torch.Tensor], length: int,
              finished: bool) -> None:
        """Offer Q candidates for each of the given images (B,): score (B, Q), -inf for none,
        tokens and logps (B, Q, t), traces (B, Q, t, *X); keep the best H per image (on equal
        scores, the earlier)."""
        offered = (score > NEG_INF).view(-1).nonzero().squeeze(1)  # (M,) flat indices
        if offered.numel() == 0:
            return
        q = score.shape[1]

        def pick(t: torch.Tensor) -> torch.Tensor:  # (B, Q, ...) -> the offered (M, ...)
            return t.reshape(-1, *t.shape[2:]).index_select(0, offered)

        picked_traces = {name: pick(t).cpu() for name, t in traces.items()}  # results live on the CPU
        rows = zip((offered // q).tolist(), pick(score).tolist(), pick(tokens).tolist(), pick(logps).tolist())
        image_ids = images.tolist()
        for m, (image, ranking, words, word_logps) in enumerate(rows):
            kept = self.kept[image_ids[image]]
            if len(kept) == self.slots and ranking <= kept[-1][0]:
                continue
            hypothesis = _hypothesis(words, word_logps, {name: t[m] for name, t in picked_traces.items()}, length,
                                     finished, self.penalty)
            kept.insert(sum(1 for s, _ in kept if s >= ranking), (ranking, hypothesis))
            del kept[self.slots:]

    def results(self, count: int) -> list[list[Hypothesis]]:
        return [[h for _, h in kept[:count]] for kept in self.kept]


@dataclass
class _Candidates:
    """One step's candidates of each image, (B, Q) each: their cumulative log-prob, the row
    (within the image) they extend, their word and its log-prob, and the constraint bits they
    have met."""

    logp: torch.Tensor
    origin: torch.Tensor
    word: torch.Tensor
    word_logp: torch.Tensor
    met: torch.Tensor


class BeamState:
    """The live beams of the images still searching, with their histories: R rows per image.
    Images whose search is done leave, so an image's result never depends on the others.

    Without required words R = K and each step keeps the best K candidates (plain beam search).
    With C required words an image keeps max(K, C + 1) rows, divided among the banks of beams
    that met 0, 1, ..., C of them (dynamic beam allocation, Post and Vilar 2018): each bank is
    guaranteed an equal share of the rows (the remainder to the banks with fewest met, whose
    beams carry the fluent prefixes), rows a bank cannot fill go to the best other candidates."""

    def __init__(self, images: int, config: DecodeConfig, bos: int, guide: "_Constraints | None", device):
        self.config, self.device = config, device
        self.k = config.num_beams
        self.goal = torch.zeros(images, dtype=torch.long, device=device)  # (B,) bits of all required words
        self.required = None
        rows = torch.full((images,), self.k, dtype=torch.long, device=device)  # (B,) rows each image uses
        self.quota = None
        if guide is not None and bool((guide.goal > 0).any()):
            self.goal = guide.goal.to(device)
            self.required = guide.required_words(device)
            banks = _popcount(self.goal) + 1  # (B,) one per number of required words met
            rows = torch.clamp(banks, min=self.k)
            self.quota = _bank_quotas(rows, banks)
        self.r = r = int(rows.max())
        self.active = torch.arange(images, device=device)  # (B,) each image's index in the batch as given
        self.logp = torch.full((images, r), NEG_INF, device=device)  # (B, R) cumulative
        self.logp[:, 0] = 0.0  # every image starts with one beam
        self.met = torch.zeros(images, r, dtype=torch.long, device=device)  # (B, R) constraint bits met
        self.tokens = torch.full((images * r,), bos, dtype=torch.long, device=device)  # (N,) next input
        self.history = torch.empty(images, r, 0, dtype=torch.long, device=device)  # (B, R, t)
        self.history_logps = torch.empty(images, r, 0, device=device)  # (B, R, t)
        self.traces: dict[str, torch.Tensor] = {}  # (B, R, t, *X) each, as `_trace` records
        if self.required is not None:  # the row (within its image) each candidate of `select` extends
            self.origin = torch.arange(r, device=device).repeat_interleave(2 * self.k + self.required.ids.shape[1])
        self._index()

    def _index(self) -> None:
        """What depends only on which images are active: each image's first row (B, 1), each
        row's image and goal for the token rules, and with required words the constant parts of
        `select`'s and `advance`'s work."""
        b, r = self.images, self.r
        self.first_row = torch.arange(b, device=self.device)[:, None] * r
        self.row_image = self.active.repeat_interleave(r)  # (N,)
        self.row_goal = self.goal.repeat_interleave(r)  # (N,)
        required = self.required
        if required is not None:
            w = required.ids.shape[1]
            self.said = required.ids[:, None].expand(b, r, w)  # (B, R, W) each row's required words
            self.padding = torch.zeros(b, 1, w, device=self.device).masked_fill_((required.bits == 0)[:, None], NEG_INF)
            plain = torch.zeros(b, r, 2 * self.k, dtype=torch.long, device=self.device)
            self.candidate_bits = torch.cat([plain, required.bits[:, None].expand(b, r, w)], dim=2).view(b, -1)  # (B, Q)
            self.past_budget = torch.arange(r, device=self.device)[None] >= self.quota.sum(dim=1, keepdim=True)  # (B, R)

    @property
    def images(self) -> int:
        return self.active.shape[0]

    def rows(self) -> Rows:
        return Rows(image=self.row_image, met=self.met.view(-1), goal=self.row_goal)

    def select(self, logp: torch.Tensor) -> _Candidates:
        """logp (N, V) of the next word -> this step's candidates: the best 2K of the R*V
        without required words; with them, the best 2K of each row besides its required words
        (so each bank has its own candidates), and every row's required words. The best of all
        lie among each row's best, so rows are ranked first: one top-k pass over (N, V), and the
        beams' log-probs are added to the few candidates only."""
        b, r, k = self.images, self.r, self.k
        rows = logp.view(b, r, -1)  # (B, R, V)
        beam = self.logp.view(b, r, 1)
        if self.required is None:
            best_logp, best_word = rows.topk(2 * k, dim=2)  # (B, R, 2K)
            top_logp, pick = (beam + best_logp).view(b, -1).topk(2 * k, dim=1)  # (B, 2K)
            origin = torch.div(pick, 2 * k, rounding_mode="floor")
            word = best_word.view(b, -1).gather(1, pick)
            word_logp = best_logp.view(b, -1).gather(1, pick)
            met = self.met[:, :1].expand_as(word)  # nothing to meet: all zero
        else:  # required words never among a row's plain candidates, each row's required words after them
            plain_logp, plain_word = rows.masked_fill(self.required.mask[:, None], NEG_INF).topk(2 * k, dim=2)  # (B, R, 2K)
            said_logp = rows.gather(2, self.said) + self.padding  # (B, R, W), -inf for padding
            word_logp = torch.cat([plain_logp, said_logp], dim=2).view(b, -1)  # (B, Q), Q = R*(2K + W)
            top_logp = (beam + word_logp.view(b, r, -1)).view(b, -1)
            word = torch.cat([plain_word, self.said], dim=2).view(b, -1)
            origin = self.origin.expand(b, -1)
            met = self.met.gather(1, origin) | self.candidate_bits
        return _Candidates(top_logp, origin, word, word_logp, met)

    def finish(self, top: _Candidates, trace: dict[str, torch.Tensor], pool: _Pool, eos: int, length: int) -> bool:
        """An <eos> among the first K candidates that met every required word enters the pool.
        -> whether any did."""
        if self.required is None:  # candidates come ranked, and every one is at the goal
            ends = top.word[:, :self.k] == eos
            if not bool(ends.any()):  # most steps: one check
                return False
            top = _Candidates(*(t[:, :self.k] for t in (top.logp, top.origin, top.word, top.word_logp, top.met)))
            ends &= top.logp > NEG_INF
        else:  # among the K best of the candidates at the goal
            ends = top.word == eos
            if not bool(ends.any()):
                return False
            at_goal = top.met == self.goal[:, None]
            ends &= at_goal
            ranked = top.logp.masked_fill(~at_goal, NEG_INF)
            ends &= (top.logp > NEG_INF) & (top.logp >= ranked.topk(self.k, dim=1).values[:, -1:])
        if not bool(ends.any()):
            return False
        tokens, logps, traces = self._extend(self.first_row + top.origin, top.word, top.word_logp, trace)
        ranked = score(top.logp, length, self.config.length_penalty).masked_fill(~ends, NEG_INF)
        pool.merge(self.active, ranked, tokens, logps, traces, length=length, finished=True)
        return True

    def advance(self, top: _Candidates, trace: dict[str, torch.Tensor], eos: int) -> torch.Tensor:
        """The best other candidates continue (by bank with required words) -> the rows (N,) they
        extend."""
        b, r = self.images, self.r
        going = top.logp.masked_fill(top.word == eos, NEG_INF)  # (B, Q)
        if self.required is None:
            self.logp, live = going.topk(self.k, dim=1)  # (B, K)
        else:
            live = _allocate(going, _popcount(top.met), self.quota, r)  # (B, R)
            self.logp = going.gather(1, live).masked_fill_(self.past_budget, NEG_INF)
        rows = self.first_row + top.origin.gather(1, live)  # (B, R)
        words = top.word.gather(1, live)
        if self.required is not None:  # else nothing is ever met
            self.met = top.met.gather(1, live)
        self.tokens = words.view(-1)
        self.history, self.history_logps, self.traces = self._extend(
            rows, words, top.word_logp.gather(1, live), trace)
        return rows.view(-1)

    def done(self, pool: _Pool, length: int) -> torch.Tensor:
        """(B,) True for images whose search is over: with early_stopping as soon as their pool
        is full, else when no live beam can still beat the pool's worst (Hugging Face's rule)."""
        worst = pool.worst(self.active)
        done = worst > NEG_INF
        if not self.config.early_stopping:
            best_live = self.logp.max(dim=1).values
            done &= (worst >= score(best_live, length, self.config.length_penalty)) | (best_live == NEG_INF)
        return done

    def keep(self, stay: torch.Tensor) -> None:
        """Keep only the images `stay` (B',) indexes."""
        self.active, self.logp, self.met, self.goal = self.active[stay], self.logp[stay], self.met[stay], self.goal[stay]
        self.tokens = self.tokens.view(-1, self.r)[stay].view(-1)
        self.history, self.history_logps = self.history[stay], self.history_logps[stay]
        self.traces = {name: t[stay] for name, t in self.traces.items()}
        if self.required is not None:
            self.required, self.quota = self.required.select(stay), self.quota[stay]
        self._index()

    def flush(self, pool: _Pool) -> None:
        """max_new_tokens reached: the live beams that met every required word compete
        unfinished; an image none of whose beams did keeps its best beams."""
        final = self.logp
        if self.required is not None:
            reached = self.met == self.goal[:, None]  # (B, R)
            fallback = ~(reached & (final > NEG_INF)).any(dim=1, keepdim=True)
            final = final.masked_fill(~reached & ~fallback, NEG_INF)
        length = self.config.max_new_tokens
        pool.merge(self.active, score(final, length, self.config.length_penalty), self.history,
                   self.history_logps, self.traces, length=length, finished=False)

    def _extend(self, rows: torch.Tensor, words: torch.Tensor, word_logps: torch.Tensor,
                trace: dict[str, torch.Tensor]):
        """Histories of candidates: rows (B, Q) of the flat (N, ...) beams, each with its new word
        and log-prob (B, Q) and the step's trace (N, *X) each -> tokens, logps (B, Q, t+1) and
        traces (B, Q, t+1, *X)."""
        b, q = rows.shape
        flat = rows.reshape(-1)

        def grown(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # past (B, R, t, *X), new (B*Q, *X)
            before = past.view(b * self.r, *past.shape[2:]).index_select(0, flat).view(b, q, *past.shape[2:])
            return torch.cat([before, new.reshape(b, q, 1, *past.shape[3:])], dim=2)

        tokens = grown(self.history, words)
        logps = grown(self.history_logps, word_logps)
        traces = {}
        for name, new in trace.items():
            past = self.traces.get(name)
            if past is None:  # the first step
                past = new.new_empty(self.images, self.r, 0, *new.shape[1:])
            traces[name] = grown(past, new.index_select(0, flat))
        return tokens, logps, traces


@functools.cache
def _popcount_table(device: torch.device) -> torch.Tensor:
    return torch.tensor([bin(bits).count("1") for bits in range(1 << MAX_CONSTRAINTS)], device=device)


def _popcount(bits: torch.Tensor) -> torch.Tensor:
    """How many of the MAX_CONSTRAINTS low bits are set, elementwise (one lookup)."""
    return torch.take(_popcount_table(bits.device), bits)


def _bank_quotas(rows: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """rows (B,) each image's row budget, banks (B,) its number of banks (required words + 1)
    -> (B, MAX_CONSTRAINTS + 1) rows guaranteed to each bank: rows // banks each, the remainder to
    the lowest banks, 0 for banks an image does not have."""
    bank = torch.arange(MAX_CONSTRAINTS + 1, device=rows.device)[None]  # (1, C+1)
    share = torch.div(rows, banks, rounding_mode="floor")[:, None] + (bank < (rows % banks)[:, None]).long()
    return share.masked_fill(bank >= banks[:, None], 0)


def _allocate(logp: torch.Tensor, bank: torch.Tensor, quota: torch.Tensor, r: int) -> torch.Tensor:
    """Dynamic beam allocation: logp (B, Q) of the candidates (-inf: none), bank (B, Q) how many
    required words each met, quota (B, C+1) rows guaranteed per bank -> the chosen candidates
    (B, R), each bank's best up to its quota first, then the best others (rows past an image's
    budget, the sum of its quota, are to be dropped)."""
    order = logp.argsort(dim=1, descending=True, stable=True)  # (B, Q) best first
    ranked_bank = bank.gather(1, order)[:, :, None]  # (B, Q, 1)
    banks = torch.arange(quota.shape[1], device=logp.device)
    place = (ranked_bank == banks).cumsum(dim=1).gather(2, ranked_bank)[:, :, 0]  # (B, Q) 1 + rank within its bank
    guaranteed = (place <= quota.gather(1, ranked_bank[:, :, 0])) & (logp.gather(1, order) > NEG_INF)
    first = (~guaranteed).to(torch.uint8).argsort(dim=1, stable=True)  # guaranteed first, each part best first
    return order.gather(1, first[:, :r])


@dataclass
class _RequiredWords:
    """The words that meet some constraint, per image: mask (B, V) True for them; ids and bits
    (B, W): their word ids and constraint bits, padded with bits 0 (W = the most of any image)."""

    mask: torch.Tensor
    ids: torch.Tensor
    bits: torch.Tensor

    def select(self, images: torch.Tensor) -> "_RequiredWords":
        return _RequiredWords(self.mask[images], self.ids[images], self.bits[images])


def _beam_search(decoder: Decoder, state: DecoderState, bos: int, eos: int, rules: list[TokenRule],
                 config: DecodeConfig, guide: "_Constraints | None" = None) -> list[list[Hypothesis]]:
    """Vectorised beam search with a pool of finished hypotheses per image, as in Hugging Face
    `generate`: each step takes the top 2K candidates; an <eos> among the first K enters the
    pool, the best K others continue (`BeamState` says how required words divide the rows). An
    image is done when its pool is full (and, without `early_stopping`, no live beam can beat the
    pool's worst). After `max_new_tokens` the live beams join the pool unfinished, so every image
    gets a caption even when no beam finished."""
    b = state.image_gates.shape[0]
    device = state.h.device
    beams = BeamState(b, config, bos, guide, device)
    pool = _Pool(b, max(config.num_beams, config.num_return_sequences), config.length_penalty)
    if guide is not None and guide.banned is not None:
        rules = rules + [ExcludeWords(guide.banned.to(device))]
    if beams.required is not None:
        rules = rules + [EndWhenMet(eos)]
    bans = Bans(rules, b, decoder.config.vocab_size, device)
    state = state.repeat(beams.r)
    for step in range(config.max_new_tokens):
        logits, state, alpha = decoder.step(beams.tokens, state)
        trace = _trace(config, state, alpha)
        logp = bans.log_probs(logits, beams.history.view(beams.images * beams.r, -1), beams.rows())  # (N, V)
        top = beams.select(logp)
        ended = beams.finish(top, trace, pool, eos, length=step + 1)
        state = state.reorder(beams.advance(top, trace, eos))
        if config.early_stopping and not ended:  # only a new end can fill a pool
            continue
        done = beams.done(pool, length=step + 1)
        if bool(done.any()):
            stay = (~done).nonzero().squeeze(1)
            if stay.numel() == 0:
                return pool.results(config.num_return_sequences)
            beams.keep(stay)
            state = state.select_images(stay)
    beams.flush(pool)
    return pool.results(config.num_return_sequences)


@dataclass
class _Constraints:
    """Required and excluded words of a batch: image b must say, for each of its constraints, one
    of that constraint's word ids, and none of its excluded ids. word_bits (B, V): bit c set where
    a word meets constraint c; goal (B,): the bits of all of an image's constraints; banned (B, V)
    or None: the excluded words."""

    word_bits: torch.Tensor
    goal: torch.Tensor
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
        return cls(bits, goal, banned)

    def required_words(self, device) -> _RequiredWords:
        mask = self.word_bits > 0
        bits, ids = self.word_bits.topk(max(1, int(mask.sum(dim=1).max())), dim=1)  # (B, W), padding last
        return _RequiredWords(mask.to(device), ids.to(device), bits.to(device))


def _outside(i) -> int:
    raise ValueError(f"required or excluded word id {i} is outside the vocabulary")

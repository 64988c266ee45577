"""Decoding: greedy, sampling and beam search, batched over images and beams.

Every method talks to the decoder only through `init_state` / `step` / `DecoderState`, and
applies the same list of token rules (`TokenRule`, in the spirit of Hugging Face's logits
processors), each of which bans words per row. A hypothesis is ranked by `score`,
written once. Beam search is a loop over the named steps of one `BeamState`: select candidates,
finish the ones that end, advance the others, drop the images that are done.

Shapes: B images, K beams (or samples) per image, R rows per image (K, or more with required
words; 1 in beam search's first step), N = B*R rows, V vocabulary, T generated tokens, P regions,
H hypotheses kept per image (the pool), Q candidates per image in one step, C required words per
image, W words that meet some required word (per image, padded).
"""

from __future__ import annotations

import struct
from array import array
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
    length ** length_penalty; 0 ranks by log_prob."""
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

class TokenRule:
    """One rule over the next word. A `fixed` rule bans the same words for every row of an image
    at every step: `words(image)` lists them (image: its index in the batch as given). Other rules
    run at every step: `__call__(bans, histories, images)` adds to bans[n], the set of words row n
    may not say, from histories[n], the words it generated so far, and images[n], its image. Rules
    run in list order; a rule that `lifts` may remove an earlier rule's bans."""

    fixed = False  # the same bans for every row of an image, at every step
    lifts = False  # may lift an earlier rule's ban

    def words(self, image: int) -> Sequence[int]:
        raise NotImplementedError

    def __call__(self, bans: list[set[int]], histories: Sequence[list[int]], images: Sequence[int]) -> None:
        for ban, image in zip(bans, images):  # a fixed rule, run with the others (see `Bans`)
            ban.update(self.words(image))


@dataclass
class BanTokens(TokenRule):
    ids: tuple[int, ...]  # special tokens: <pad>, <bos>, <unk>
    fixed = True

    def words(self, image):
        return self.ids


@dataclass
class MinLength(TokenRule):
    eos: int
    min_new_tokens: int

    def __call__(self, bans, histories, images):
        if histories and len(histories[0]) < self.min_new_tokens:  # every row is as long
            for ban in bans:
                ban.add(self.eos)


@dataclass
class NoRepeatNgram(TokenRule):
    n: int  # never say an n-gram a row has said

    def __call__(self, bans, histories, images):
        n = self.n
        for ban, words in zip(bans, histories):
            if n == 1:
                ban.update(words)
            elif len(words) >= n and words.count(words[-1]) > 1:  # else its last n-1 words are new
                suffix = words[len(words) - n + 1:]
                for start in range(len(words) - n + 1):
                    if words[start:start + n - 1] == suffix:
                        ban.add(words[start + n - 1])


@dataclass
class EndWhenStuck(TokenRule):
    """A row the rules before leave no word may end (a vocabulary as small as the words said)."""

    eos: int
    vocab_size: int
    lifts = True

    def __call__(self, bans, histories, images):
        for ban in bans:
            if len(ban) >= self.vocab_size:
                ban.discard(self.eos)


@dataclass
class ExcludeWords(TokenRule):
    ids: Sequence[Sequence[int]]  # ids[b]: the words image b's captions must not say
    fixed = True

    def words(self, image):
        return self.ids[image]


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
        rules.append(EndWhenStuck(eos, vocab_size))
    return rules


class Bans:
    """The token rules of one decoding, in list order, applied as -inf to scores (N, V). Where no
    rule lifts bans, the fixed rules' words are listed per image once, and their (row, word)
    positions made again only when the rows' images change (images leave); the other rules run
    at every step on the rows' histories, in Python: a few words per row, where a (N, V) mask
    costs passes over every word."""

    def __init__(self, rules: Sequence[TokenRule], images: int, device):
        lifting = any(rule.lifts for rule in rules)  # it must see every ban: all rules run each step
        self.per_image: list[set[int]] = [set() for _ in range(images)]
        self.each_step: list[TokenRule] = []
        for rule in rules:
            if rule.fixed and not lifting:
                for image, words in enumerate(self.per_image):
                    words.update(rule.words(image))
            else:
                self.each_step.append(rule)
        self.neg_inf = torch.tensor(NEG_INF, device=device)
        self._fixed: tuple[Sequence[int], tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def apply(self, scores: torch.Tensor, histories: Sequence[list[int]], images: Sequence[int]) -> torch.Tensor:
        """scores (N, V), in place: -inf where a rule bans the word. histories[n]: row n's words
        so far; images[n]: its image's index in the batch as given (the same list object while
        the rows' images stay)."""
        if self._fixed is None or self._fixed[0] is not images:
            self._fixed = images, self._positions([self.per_image[image] for image in images], scores.device)
        if self._fixed[1] is not None:
            scores.index_put_(self._fixed[1], self.neg_inf)
        if self.each_step:
            bans: list[set[int]] = [set() for _ in images]
            for rule in self.each_step:
                rule(bans, histories, images)
            positions = self._positions(bans, scores.device)
            if positions is not None:
                scores.index_put_(positions, self.neg_inf)
        return scores

    def log_probs(self, logits: torch.Tensor, histories: Sequence[list[int]], images: Sequence[int]) -> torch.Tensor:
        """logits (N, V) -> log-probs (N, V), -inf where a rule bans the word."""
        return self.apply(logits.log_softmax(dim=-1, dtype=torch.float32), histories, images)

    @staticmethod
    def _positions(bans: Sequence[set[int]], device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's banned words -> (rows, words) index tensors, or None for no bans."""
        rows = [n for n, words in enumerate(bans) for _ in words]
        if not rows:
            return None
        return _tensor(rows, torch.long, device), _tensor([w for ban in bans for w in ban], torch.long, device)


_TYPECODES = {torch.long: "q", torch.float32: "f"}  # torch dtype -> array typecode


def _tensor(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """A short list of numbers as a tensor (its length,): through a buffer, a third of the cost
    of torch.tensor, which every beam step pays for a few small tensors."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    t = torch.frombuffer(array(_TYPECODES[dtype], values), dtype=dtype)
    return t if torch.device(device).type == "cpu" else t.to(device)


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
    images = [image for image in range(b) for _ in range(k)]  # each row's
    bans = Bans(rules, b, device)
    tokens = torch.full((n,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    length = torch.zeros(n, dtype=torch.long, device=device)
    history: list[list[int]] = [[] for _ in range(n)]
    step_logps, traces = [], {}
    for _ in range(config.max_new_tokens):
        logits, state, alpha = decoder.step(tokens, state)
        logp = bans.log_probs(logits, history, images)  # (N, V)
        tokens = _draw(logp, config, generator) if config.do_sample else logp.argmax(dim=-1)
        tokens = tokens.masked_fill(finished, eos)  # finished rows idle on <eos>
        step_logps.append(logp.gather(1, tokens[:, None]).squeeze(1).masked_fill(finished, 0.0))
        for name, value in _trace(config, state, alpha).items():
            traces.setdefault(name, []).append(value)
        length += (~finished).long()
        for words, token in zip(history, tokens.tolist()):
            words.append(token)
        finished |= tokens == eos
        if bool(finished.all()):
            break
    token_logps = torch.stack(step_logps, dim=1).cpu()  # (N, T)
    stacked = {name: torch.stack(values, dim=1).cpu() for name, values in traces.items()}  # (N, T, *X) each
    token_logps, length, finished = token_logps.tolist(), length.tolist(), finished.tolist()
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
#
# Tensor work is the decoder's step, the token rules over (N, V) and each row's best words. The
# rest, choosing among a few dozen candidates per image, is done in Python on their numbers: as
# tensor operations it would take some 60 small operations a step, each costing more to dispatch
# than its arithmetic. Cumulative log-probs come from the tensors (fp32) and scores are rounded
# to fp32, so every comparison is the one fp32 tensors would make.

_FP32 = struct.Struct("f")


def _score32(log_prob: float, length: int, penalty: float) -> float:
    """`score` as fp32 tensors compute it, the divisor rounded to fp32 first: hypotheses whose
    log-probs are one fp32 step apart keep their order."""
    if not penalty:
        return log_prob
    divisor = _FP32.unpack(_FP32.pack(max(length, 1) ** penalty))[0]
    return _FP32.unpack(_FP32.pack(log_prob / divisor))[0]


class _Beam:
    """One live row: its cumulative log-prob (fp32), the constraint bits it has met, its words
    and their log-probs so far, and the row it occupied at each step (where its traces are)."""

    __slots__ = ("logp", "met", "tokens", "logps", "path")

    def __init__(self, logp: float, met: int, tokens: list[int], logps: list[float], path: list[int]):
        self.logp, self.met, self.tokens, self.logps, self.path = logp, met, tokens, logps, path


# A candidate, an extension of a live row by one word, is a plain tuple (cheaper to make than a
# named one, and a step makes hundreds): (cumulative log-prob, the row within the image it
# extends, the word, the word's log-prob, the constraint bits met with it).
_Candidate = tuple[float, int, int, float, int]
_LOGP, _WORD, _MET = 0, 2, 4  # the fields read by index


class _Pool:
    """The best finished (or, at the end, truncated) hypotheses of every image, at most H = slots
    each, best first, as (ranking score, words, log-probs, rows per step, finished)."""

    def __init__(self, images: int, slots: int, penalty: float):
        self.slots, self.penalty = slots, penalty
        self.kept: list[list[tuple]] = [[] for _ in range(images)]

    def full(self, image: int) -> bool:
        return len(self.kept[image]) == self.slots

    def worst(self, image: int) -> float:
        """The score the image's pool would drop next (-inf while it has a free slot)."""
        kept = self.kept[image]
        return kept[-1][0] if len(kept) == self.slots else NEG_INF

    def offer(self, image: int, ranking: float, tokens: list[int], logps: list[float], path: list[int],
              finished: bool) -> None:
        """Keep the hypothesis if it is among the image's best H (on equal scores, the earlier)."""
        kept = self.kept[image]
        if ranking == NEG_INF or (len(kept) == self.slots and ranking <= kept[-1][0]):
            return
        kept.insert(sum(1 for s, *_ in kept if s >= ranking), (ranking, tokens, logps, path, finished))
        del kept[self.slots:]

    def results(self, count: int, steps: list[dict[str, torch.Tensor]]) -> list[list[Hypothesis]]:
        """The best `count` of each image, their traces gathered from each step's (N, *X) along
        their rows, on the CPU."""
        def traces(path: list[int]) -> dict[str, torch.Tensor]:
            if not steps:
                return {}
            return {name: torch.stack([steps[s][name][row] for s, row in enumerate(path)]).cpu() for name in steps[0]}

        return [[_hypothesis(tokens, logps, traces(path), len(tokens), finished, self.penalty)
                 for _, tokens, logps, path, finished in kept[:count]] for kept in self.kept]


class BeamState:
    """The live beams of the images still searching: R rows per image, N = B*R in all: one at
    the first step (<bos>; the others would hold no beam), then the width. Images whose search
    is done leave, so an image's result never depends on the others.

    Without required words R = K and each step keeps the best K candidates (plain beam search).
    With C required words an image keeps max(K, C + 1) rows, divided among the banks of beams
    that met 0, 1, ..., C of them (dynamic beam allocation, Post and Vilar 2018): each bank is
    guaranteed an equal share of the rows (the remainder to the banks with fewest met, whose
    beams carry the fluent prefixes), rows a bank cannot fill go to the best other candidates.

    The decoder's inputs live in tensors: `tokens` (N,) the next words and `beam_logp` (N,) the
    rows' cumulative log-probs."""

    def __init__(self, images: int, config: DecodeConfig, bos: int, eos: int, guide: "_Constraints | None", device):
        self.config, self.device, self.k = config, device, config.num_beams
        self.active = list(range(images))  # each image's index in the batch as given
        self.goal = [0] * images  # (B,) bits of all required words
        self.required: list[tuple[set[int], set[int]]] | None = None  # with required words, each image's;
        # and the same with <eos>, which a row that has not met them all may not say
        self.said: list[list[tuple[int, int]]] = [[] for _ in range(images)]  # (word, bits) of each image's required words
        self.said_ids: torch.Tensor | None = None  # (B, W) the same words, padded
        budget = [self.k] * images  # rows each image uses
        self.quota = [[self.k] for _ in range(images)]  # rows guaranteed to each bank
        if guide is not None and any(guide.goal):
            self.goal, self.said = list(guide.goal), guide.said
            self.required = [({i for i, _ in said}, {i for i, _ in said} | {eos}) for said in self.said]
            w = max(len(said) for said in self.said)
            padded = [i for said in self.said for i in [word for word, _ in said] + [0] * (w - len(said))]
            self.said_ids = _tensor(padded, torch.long, device).view(images, w)  # padded with word 0
            for image, goal in enumerate(self.goal):
                banks = goal.bit_count() + 1  # one per number of required words met
                budget[image] = max(self.k, banks)
                self.quota[image] = _bank_quotas(budget[image], banks)
        self.budget = budget
        self.width = max(budget)  # rows per image after the first step
        self.r = 1
        self.beams = [_Beam(0.0, 0, [], [], []) for _ in range(images)]
        self.tokens = torch.full((images,), bos, dtype=torch.long, device=device)  # (N,)
        self.beam_logp = torch.zeros(images, device=device)  # (N,)
        self.steps: list[dict[str, torch.Tensor]] = []  # each step's traces (N, *X), as `_trace` records
        self._index()

    def _index(self) -> None:
        """What depends only on which images are active: each row's image for the token rules;
        with required words each row's required words (N, W)."""
        r = self.r
        self.row_images = [image for image in self.active for _ in range(r)]  # (N,)
        if self.required is not None:
            self.said_rows = self.said_ids.repeat_interleave(r, dim=0)  # (N, W)

    @property
    def images(self) -> int:
        return len(self.active)

    def histories(self) -> list[list[int]]:
        """Each row's words so far (rows without a beam: any words, their log-prob rules them out)."""
        return [beam.tokens for beam in self.beams]

    def record(self, trace: dict[str, torch.Tensor]) -> None:
        if trace:
            self.steps.append(trace)

    def ranked(self, image: int) -> bool:
        """Whether the image (its position among the active) has no required words: its
        candidates come ranked and the best K that do not end go on, as in plain beam search."""
        return self.required is None or not self.goal[image]

    def offered(self) -> int:
        """How many words a row offers besides required ones: a step continues at most `width`
        beams from a row and ends at most one, so its best width + 1 are all that can be chosen
        (up to the order top-k gives tied words)."""
        return self.width + 1

    def select(self, logp: torch.Tensor) -> list[list[_Candidate]]:
        """logp (N, V) of the next word -> each image's candidates from its live rows, each row's
        `offered()` best words: an image without required words takes them ranked, the best 2K;
        one with required words each row's best besides them (so each bank has its own
        candidates) and every row's required words, in row order. One top-k pass over (N, V); the
        rest on a few numbers per row. Rows that hold no beam (-inf) offer none."""
        b, r, k2 = self.images, self.r, 2 * self.k
        best = self.offered()
        if self.required is None:
            word_logp, word = logp.topk(min(best, logp.shape[1]), dim=1)  # (N, width + 1)
        else:  # each row's best width + 1 + W + 1 words hold its best width + 1 that are neither
            # required nor a forbidden <eos>; its required words after them
            word_logp, word = logp.topk(min(best + self.said_rows.shape[1] + 1, logp.shape[1]), dim=1)
            word_logp = torch.cat([word_logp, logp.gather(1, self.said_rows)], dim=1)  # (N, width + 2W + 2)
        cum, word_logp, word = (self.beam_logp[:, None] + word_logp).tolist(), word_logp.tolist(), word.tolist()
        candidates = []
        for image in range(b):
            each = []
            ranked = self.ranked(image)
            for n in range(image * r, image * r + r):
                beam = self.beams[n]
                if beam.logp == NEG_INF:
                    continue
                row, met, row_cum, row_logp = n - image * r, beam.met, cum[n], word_logp[n]
                if ranked:
                    each += [(c, row, w, lp, met) for c, w, lp in zip(row_cum[:best], word[n][:best], row_logp[:best])]
                    continue
                # only a row that met every required word may end
                skip = self.required[image][met != self.goal[image]]
                plain = word[n]
                each += [(c, row, w, lp, met) for c, w, lp in zip(row_cum, plain, row_logp) if w not in skip][:best]
                said = len(plain)
                each += [(c, row, w, lp, met | bits)
                         for c, lp, (w, bits) in zip(row_cum[said:], row_logp[said:], self.said[image])]
            if ranked:
                each.sort(key=_by_logp, reverse=True)  # stable: on ties, the earlier row (then top-k's order)
                del each[k2:]
            candidates.append(each)
        return candidates

    def finish(self, candidates: list[list[_Candidate]], pool: _Pool, eos: int, length: int) -> bool:
        """An <eos> among the first K candidates that met every required word enters the pool.
        -> whether any did."""
        ended, k, r, penalty = False, self.k, self.r, self.config.length_penalty
        for image, top in enumerate(candidates):
            if self.ranked(image):  # every one is at the goal
                ends = [c for c in top[:k] if c[_WORD] == eos and c[_LOGP] > NEG_INF]
            else:  # among the K best of the candidates at the goal
                if not any(c[_WORD] == eos for c in top):
                    continue
                goal = self.goal[image]
                at_goal = sorted((c[_LOGP] for c in top if c[_MET] == goal), reverse=True)
                kth = at_goal[k - 1] if len(at_goal) >= k else NEG_INF
                ends = [c for c in top if c[_WORD] == eos and c[_MET] == goal and c[_LOGP] > NEG_INF
                        and c[_LOGP] >= kth]
            for logp, origin, word, word_logp, _ in ends:
                beam = self.beams[image * r + origin]
                pool.offer(self.active[image], _score32(logp, length, penalty), beam.tokens + [word],
                           beam.logps + [word_logp], beam.path + [image * r + origin], finished=True)
                ended = True
        return ended

    def advance(self, candidates: list[list[_Candidate]], eos: int) -> torch.Tensor:
        """The best other candidates continue (by bank with required words); rows left over
        hold no beam -> the rows (N,) they extend, `width` per image."""
        r, width = self.r, self.width
        beams, rows = [], []
        for image, top in enumerate(candidates):
            first = image * r
            going = [NEG_INF if c[_WORD] == eos else c[_LOGP] for c in top]
            if self.ranked(image):  # the first K that do not end
                live = [q for q, logp in enumerate(going) if logp > NEG_INF][:self.k]
            else:
                live = _allocate(going, [c[_MET].bit_count() for c in top], self.quota[image], width)
            for slot in range(width):
                if slot < len(live) and slot < self.budget[image] and going[live[slot]] > NEG_INF:
                    logp, origin, word, word_logp, met = top[live[slot]]
                    beam = self.beams[first + origin]
                    beams.append(_Beam(logp, met, beam.tokens + [word], beam.logps + [word_logp],
                                       beam.path + [first + origin]))
                    rows.append(first + origin)
                else:  # no beam: any row's history will do, its log-prob keeps it out of every choice
                    beams.append(_Beam(NEG_INF, 0, self.beams[first].tokens + [eos], [], []))
                    rows.append(first)
        self.beams = beams
        if r != width:
            self.r = width
            self._index()
        self.tokens = _tensor([b.tokens[-1] for b in beams], torch.long, self.device)
        self.beam_logp = _tensor([b.logp for b in beams], torch.float32, self.device)
        return _tensor(rows, torch.long, self.device)

    def done(self, pool: _Pool, length: int) -> list[bool]:
        """True for images whose search is over: with early_stopping as soon as their pool is
        full, else when no live beam can still beat the pool's worst (Hugging Face's rule)."""
        done = [pool.full(image) for image in self.active]
        if not self.config.early_stopping:
            r = self.r
            for i, image in enumerate(self.active):
                best_live = max(b.logp for b in self.beams[i * r:(i + 1) * r])
                done[i] = done[i] and (best_live == NEG_INF or pool.worst(image) >= _score32(
                    best_live, length, self.config.length_penalty))
        return done

    def keep(self, stay: list[int]) -> torch.Tensor:
        """Keep only the images at positions `stay` -> their positions as a tensor (B',)."""
        r = self.r
        rows = [image * r + row for image in stay for row in range(r)]
        self.active = [self.active[i] for i in stay]
        self.goal, self.said = [self.goal[i] for i in stay], [self.said[i] for i in stay]
        self.quota, self.budget = [self.quota[i] for i in stay], [self.budget[i] for i in stay]
        self.beams = [self.beams[n] for n in rows]
        images, rows = _tensor(stay, torch.long, self.device), _tensor(rows, torch.long, self.device)
        self.tokens, self.beam_logp = self.tokens.index_select(0, rows), self.beam_logp.index_select(0, rows)
        if self.required is not None:
            self.required, self.said_ids = [self.required[i] for i in stay], self.said_ids[images]
        self._index()
        return images

    def flush(self, pool: _Pool) -> None:
        """max_new_tokens reached: the live beams that met every required word compete
        unfinished; an image none of whose beams did keeps its best beams."""
        length, r = self.config.max_new_tokens, self.r
        for i, image in enumerate(self.active):
            beams = self.beams[i * r:(i + 1) * r]
            reached = [b for b in beams if b.met == self.goal[i] and b.logp > NEG_INF]
            for b in reached or beams:
                pool.offer(image, _score32(b.logp, length, self.config.length_penalty), b.tokens, b.logps, b.path,
                           finished=False)


def _by_logp(candidate: _Candidate) -> float:
    return candidate[_LOGP]


def _bank_quotas(rows: int, banks: int) -> list[int]:
    """An image's row budget and number of banks (required words + 1) -> the rows guaranteed to
    each bank: rows // banks each, the remainder to the lowest banks."""
    return [rows // banks + (bank < rows % banks) for bank in range(banks)]


def _allocate(logp: list[float], bank: list[int], quota: list[int], r: int) -> list[int]:
    """Dynamic beam allocation: logp (Q,) of an image's candidates (-inf: none), bank (Q,) how
    many required words each met, quota the rows guaranteed per bank -> the chosen candidates
    (at most R): each bank's best up to its quota first, then the best others, each part best
    first (ties: the earlier candidate). Rows past the image's budget, the sum of its quota, are
    to be dropped, so once every bank has its quota no others follow."""
    taken = [0] * len(quota)
    guaranteed, others = [], []
    budget = sum(quota)
    for q in sorted(range(len(logp)), key=logp.__getitem__, reverse=True):
        b = bank[q]
        if logp[q] > NEG_INF and taken[b] < quota[b]:
            taken[b] += 1
            guaranteed.append(q)
            if len(guaranteed) == budget:
                break  # every bank is full: the rows within the budget are chosen
        else:
            others.append(q)
    return (guaranteed + others)[:r]


def _beam_search(decoder: Decoder, state: DecoderState, bos: int, eos: int, rules: list[TokenRule],
                 config: DecodeConfig, guide: "_Constraints | None" = None) -> list[list[Hypothesis]]:
    """Vectorised beam search with a pool of finished hypotheses per image, as in Hugging Face
    `generate`: each step ranks the best 2K candidates (of each row's best K + 1 words: no others
    could be chosen); an <eos> among the first K enters the pool, the best K others continue
    (`BeamState` says how required words divide the rows). An image is done when its pool is full
    (and, without `early_stopping`, no live beam can beat the pool's worst). After
    `max_new_tokens` the live beams join the pool unfinished, so every image gets a caption even
    when no beam finished."""
    b = state.image_gates.shape[0]
    device = state.h.device
    beams = BeamState(b, config, bos, eos, guide, device)
    pool = _Pool(b, max(config.num_beams, config.num_return_sequences), config.length_penalty)
    if guide is not None and guide.excluded is not None:
        rules = rules + [ExcludeWords(guide.excluded)]
    bans = Bans(rules, b, device)
    for step in range(config.max_new_tokens):
        logits, state, alpha = decoder.step(beams.tokens, state)
        beams.record(_trace(config, state, alpha))
        logp = bans.log_probs(logits, beams.histories(), beams.row_images)  # (N, V)
        candidates = beams.select(logp)
        ended = beams.finish(candidates, pool, eos, length=step + 1)
        state = state.reorder(beams.advance(candidates, eos))
        if config.early_stopping and not ended:  # only a new end can fill a pool
            continue
        done = beams.done(pool, length=step + 1)
        if any(done):
            stay = [i for i, d in enumerate(done) if not d]
            if not stay:
                return pool.results(config.num_return_sequences, beams.steps)
            state = state.select_images(beams.keep(stay))
    beams.flush(pool)
    return pool.results(config.num_return_sequences, beams.steps)

@dataclass
class _Constraints:
    """Required and excluded words of a batch: image b must say, for each of its constraints, one
    of that constraint's word ids, and none of its excluded ids. said[b]: (word id, bits) of each
    word that meets some constraint of image b, bit c set where it meets constraint c, in the
    order given; goal[b]: the bits of all of its constraints; excluded[b] (or None for no
    exclusions): the ids image b must not say. Plain numbers: a handful per image."""

    said: list[list[tuple[int, int]]]
    goal: list[int]
    excluded: list[list[int]] | None = None

    @classmethod
    def build(cls, constraints: Sequence[Sequence[Sequence[int]]], excluded: Sequence[Sequence[int]] | None,
              vocab_size: int) -> "_Constraints | None":
        """constraints[b] = image b's constraints, each a sequence of word ids (its forms);
        excluded[b] = the ids image b must not say."""
        most = max((len(c) for c in constraints), default=0)
        if most > MAX_CONSTRAINTS:
            raise ValueError(f"at most {MAX_CONSTRAINTS} required words per image, got {most}")
        check = lambda i: int(i) if 0 <= int(i) < vocab_size else _outside(i)  # noqa: E731
        said = []
        for required in constraints:
            bits: dict[int, int] = {}
            for c, ids in enumerate(required):
                for i in ids:
                    word = check(i)
                    bits[word] = bits.get(word, 0) | 1 << c
            said.append(list(bits.items()))
        goal = [(1 << len(required)) - 1 for required in constraints]
        if excluded is not None and any(excluded):
            excluded = [[check(i) for i in ids] for ids in excluded]
            for words, ids in zip(said, excluded):
                if {word for word, _ in words} & set(ids):
                    raise ValueError("a word cannot be both required and excluded")
        else:
            excluded = None
        if most == 0 and excluded is None:
            return None
        return cls(said, goal, excluded)


def _outside(i) -> int:
    raise ValueError(f"required or excluded word id {i} is outside the vocabulary")

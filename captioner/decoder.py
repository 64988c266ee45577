"""Recurrent word decoder with optional soft attention (Show, Attend and Tell).

Shapes: B images, K sequences per image (beams or samples), N = B*K sequences, P regions,
E encoder feature dim, F projected feature dim, A attention dim, D hidden dim, L layers,
G gate width (4D for LSTM, 3D for GRU, D for a tanh RNN), T tokens, V vocabulary.

Every step, the first layer receives [word embedding, pooled image vector, attended context];
the pooled image vector is a constant input. Everything that does not change per step is computed
once per image in `init_state` (the region projection, its attention projection, and the image's
contribution to the first layer's gates) and shared by the image's K sequences by broadcasting,
so beams never copy it.

Visual concepts (`concepts` > 0, Hendricks et al.'s DCC and Venugopalan et al.'s NOC in spirit):
the constant input is the pooled vector's projection plus a projection of W concept confidences,
the encoder's own ImageNet head mapped to caption words and calibrated (`captioner.tagger`), or
word detectors learned from the captions (`training.concepts`, one sigmoid class per word), which
the decoder computes from the pooled vector itself (`concept_probs`, a frozen copy of the head).
Captions without photos, decoded with the image absent, get confidences made from their own
words instead (`training.text.TextConcepts`): so the decoder learns from text how photos whose
head says "pizza" or "toilet" are described, which its paired photos never show it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

from .products import ProductParts, Projection, product
from .scripting import scripted
from .tagger import ACTIVATIONS

CELLS = {"lstm": 4, "gru": 3, "rnn": 1}  # gate width in units of D


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int = 1280  # E, from the encoder
    embed_dim: int = 256
    hidden_dim: int = 384  # D
    memory_dim: int = 256  # F
    attention: bool = True
    attention_dim: int = 256  # A
    cell: str = "lstm"
    num_layers: int = 1
    dropout: float = 0.5
    tie_embeddings: bool = True  # output = (W h) . embedding: fewer weights to read per step
    concepts: int = 0  # W concept words whose confidences join the constant input (0: none)
    concept_classes: int = 0  # C classes of the head behind them
    concept_activation: str = "softmax"  # the head's: "softmax" (ImageNet classes), "sigmoid" (word detectors)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {self.cell!r}")
        if not 1 <= self.num_layers <= 4:
            raise ValueError(f"num_layers must be between 1 and 4, not {self.num_layers}")
        if (self.concepts > 0) != (self.concept_classes > 0):
            raise ValueError("concepts and concept_classes go together (both 0, or both positive)")
        if self.concept_activation not in ACTIVATIONS:
            raise ValueError(f"concept_activation must be one of {ACTIVATIONS}, not {self.concept_activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderConfig":
        return cls(**data)


@dataclass
class DecoderState:
    """Per-sequence recurrent state and per-image constants."""

    h: torch.Tensor  # (L, N, D)
    c: torch.Tensor | None  # (L, N, D), LSTM only
    image_gates: torch.Tensor  # (B, G): the pooled vector's constant share of layer 0's gates
    memory: torch.Tensor | None  # (B, P, F) projected regions, attention only
    memory_att: torch.Tensor | None  # (B, P, A) their attention projection m (in inference e^(-2m), see `_attend`)
    fast: "_InferenceWeights | None" = None  # decoding-time weights, looked up once per decode
    record_gates: bool = False  # keep each step's top-layer LSTM gates in `gates` (for inspection)
    gates: torch.Tensor | None = None  # (N, 4, D) i, f, g, o of the step that made this state

    @property
    def group_size(self) -> int:  # K
        return self.h.shape[1] // self.image_gates.shape[0]

    def with_sequences(self, h: torch.Tensor, c: torch.Tensor | None, gates: torch.Tensor | None = None) -> "DecoderState":
        """The same images with new sequence state (cheaper than dataclasses.replace per step)."""
        return DecoderState(h, c, self.image_gates, self.memory, self.memory_att, self.fast, self.record_gates,
                            gates if self.record_gates else None)

    def repeat(self, k: int) -> "DecoderState":
        """K copies of each image's sequence state, adjacent: rows b*K .. b*K+K-1."""
        c = None if self.c is None else self.c.repeat_interleave(k, dim=1)
        return self.with_sequences(self.h.repeat_interleave(k, dim=1), c)

    def reorder(self, rows: torch.Tensor) -> "DecoderState":
        """Pick sequence rows (N,) (beam reordering); rows must stay within their image."""
        c = None if self.c is None else self.c.index_select(1, rows)
        gates = None if self.gates is None else self.gates.index_select(0, rows)
        return self.with_sequences(self.h.index_select(1, rows), c, gates)

    def select_images(self, images: torch.Tensor) -> "DecoderState":
        """Keep only the given images (B',) and their sequences."""
        k = self.group_size
        rows = (images[:, None] * k + torch.arange(k, device=images.device)).flatten()
        state = self.reorder(rows)
        pick = lambda t: None if t is None else t.index_select(0, images)  # noqa: E731
        return replace(
            state, image_gates=pick(self.image_gates), memory=pick(self.memory), memory_att=pick(self.memory_att)
        )


class Dropout(nn.Dropout):
    """nn.Dropout with the mask drawn as uniform < keep: the same distribution, and on CPUs
    2-3x faster than the bernoulli_ draw nn.Dropout makes (46 masks per training step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        keep = 1.0 - self.p
        return x * ((torch.rand_like(x) < keep).to(x.dtype) * (1.0 / keep))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        gates = CELLS[c.cell] * c.hidden_dim  # G
        self.feature_proj = nn.Linear(c.feature_dim, c.memory_dim)
        self.feature_dropout = Dropout(c.dropout)
        self.init_h = nn.Linear(c.memory_dim, c.num_layers * c.hidden_dim)
        self.init_c = nn.Linear(c.memory_dim, c.num_layers * c.hidden_dim) if c.cell == "lstm" else None
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        # Layer 0's input weights, split by input so that constant parts are applied once.
        self.word_gates = nn.Linear(c.embed_dim, gates, bias=False)
        self.image_gates = nn.Linear(c.memory_dim, gates)
        self.context_gates = nn.Linear(c.memory_dim, gates, bias=False) if c.attention else None
        # Layers 1..L-1 take the layer below's output.
        self.input_gates = nn.ModuleList(nn.Linear(c.hidden_dim, gates) for _ in range(c.num_layers - 1))
        self.hidden_gates = nn.ModuleList(nn.Linear(c.hidden_dim, gates) for _ in range(c.num_layers))
        if c.attention:
            self.memory_att = nn.Linear(c.memory_dim, c.attention_dim)
            self.hidden_att = nn.Linear(c.hidden_dim, c.attention_dim, bias=False)
            self.att_score = nn.Linear(c.attention_dim, 1, bias=False)
            self.context_gate = nn.Linear(c.hidden_dim, c.memory_dim)  # the "beta" gate
        self.dropout = Dropout(c.dropout)
        if c.tie_embeddings:
            self.output_proj = nn.Linear(c.hidden_dim, c.embed_dim, bias=False)
            self.output_bias = nn.Parameter(torch.zeros(c.vocab_size))
        else:
            self.output = nn.Linear(c.hidden_dim, c.vocab_size)
        if c.concepts:
            # Zero at first, so a model given concepts to fine-tune starts as it was.
            self.concept_proj = nn.Linear(c.concepts, c.memory_dim, bias=False)
            nn.init.zeros_(self.concept_proj.weight)
            # The frozen concept head (`set_concept_head`): classifier, class -> word map, Platt a, b.
            self.register_buffer("concept_weight", torch.zeros(c.concept_classes, c.feature_dim))  # (C, E)
            self.register_buffer("concept_bias", torch.zeros(c.concept_classes))  # (C,)
            self.register_buffer("concept_words", torch.zeros(c.concept_classes, c.concepts))  # (C, W) 0/1
            self.register_buffer("concept_platt", torch.tensor([1.0, 0.0, 0.0]))  # a, b, 1 for a log input
        self._inference: _InferenceWeights | None = None
        self.products = "fp32"  # the precision of decoding's products (`products.PRODUCTS`): the path sets it
        self._lstm_cell = lstm_cell  # compile_elementwise() swaps in a compiled version

    @property
    def can_record_gates(self) -> bool:
        return self.config.cell == "lstm"

    def compile_elementwise(self) -> None:
        """Training on CPUs: the LSTM cell's gate arithmetic, forward and backward, fused by
        torch.compile into one loop each instead of one pass over memory per operation. The
        matrix products stay outside, as does dropout (self-critical training replays its
        masks). Used only where gradients are tracked, so decoding, sampling and export keep the
        eager function. Compiling takes a few seconds per batch shape; it needs a C++ compiler."""
        self._lstm_cell = torch.compile(lstm_cell, dynamic=False)

    @torch.no_grad()
    def set_concept_head(self, tagger) -> None:
        """Copy a `captioner.tagger.Tagger` (its head, class -> word map and calibration) as the
        concept head; its words, in order, are the W concepts."""
        c = self.config
        if (len(tagger.words), len(tagger.class_names), tagger.activation) != (
                c.concepts, c.concept_classes, c.concept_activation):
            raise ValueError(f"a {tagger.activation} tagger of {len(tagger.words)} words and {len(tagger.class_names)} "
                             f"classes for a decoder of {c.concepts} concepts and {c.concept_classes} "
                             f"{c.concept_activation} classes")
        self.concept_weight.copy_(tagger.weight)
        self.concept_bias.copy_(tagger.bias)
        self.concept_words.copy_(tagger.word_matrix())
        calibration = tagger.calibration or {"a": 1.0, "b": 0.0, "input": "logit"}
        self.concept_platt.copy_(torch.tensor([calibration["a"], calibration["b"],
                                               float(calibration["input"] == "log")]))

    def concept_probs(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, E) -> (B, W) calibrated concept confidences: `Tagger.word_probs`, written
        with ops every exporter knows (the class -> word sum as a product)."""
        logits = nnf.linear(pooled.float(), self.concept_weight, self.concept_bias)  # (B, C)
        probs = logits.sigmoid() if self.config.concept_activation == "sigmoid" else logits.softmax(dim=-1)
        raw = (probs @ self.concept_words).clamp(1e-12, 1 - 1e-6)  # (B, W)
        a, b, log_input = self.concept_platt.unbind()
        x = raw.log() - (1 - log_input) * (1 - raw).log()  # logit(raw), or log(raw)
        return torch.sigmoid(a * x + b)

    # -- the step API used by every decoding method ---------------------------------------------

    def init_state(self, regions: torch.Tensor, pooled: torch.Tensor,
                   concepts: torch.Tensor | None = None, *, record_gates: bool = False,
                   packed: bool = True) -> DecoderState:
        """regions (B, P, E), pooled (B, E) -> state with one sequence per image. With concept
        inputs, `concepts` (B, W) overrides the confidences the head computes from `pooled`
        (captions without photos). `record_gates` (LSTM): every later state carries the top
        layer's gate activations of the step that made it. In inference (eval, no gradients) the
        state carries the packed decoding weights and `step` uses them; `packed=False` gives the
        modules' own computation, which training and the ONNX export trace."""
        c = self.config
        if record_gates and c.cell != "lstm":
            raise ValueError(f"record_gates needs an LSTM decoder, not {c.cell!r}")
        fast = self._fast() if packed else None
        if fast is not None:
            return self._init_fast(regions, pooled, concepts, fast, record_gates)
        image = self._with_concepts(self.feature_dropout(self.feature_proj(pooled)), pooled, concepts)  # (B, F)
        h = self._layers(self.init_h(image))
        cell = None if self.init_c is None else self._layers(self.init_c(image))
        memory = memory_att = None
        if c.attention:
            memory = self.feature_dropout(self.feature_proj(regions))  # (B, P, F)
            memory_att = self.memory_att(memory)  # (B, P, A)
        return DecoderState(h, cell, self.image_gates(image), memory, memory_att, None, record_gates)

    def _init_fast(self, regions, pooled, concepts, fast: "_InferenceWeights", record_gates: bool) -> DecoderState:
        """`init_state` in inference: the pooled vector and the regions through one projection,
        init_h, init_c and the image's gates through another."""
        c = self.config
        b, p, e = regions.shape
        inputs = torch.cat([pooled[:, None], regions], dim=1) if c.attention else pooled[:, None]  # (B, 1 [+ P], E)
        projected = fast.feature_proj(inputs.reshape(-1, e).float()).view(b, inputs.shape[1], -1)  # (B, 1 [+ P], F)
        image = self._with_concepts(projected[:, 0], pooled, concepts)
        layers = c.num_layers * c.hidden_dim
        starts = fast.init(image)  # (B, L*D [+ L*D] + G)
        h = self._layers(starts[:, :layers])
        cell = None if self.init_c is None else self._layers(starts[:, layers:2 * layers])
        image_gates = starts[:, (1 if cell is None else 2) * layers:]  # (B, G)
        memory = memory_att = None
        if c.attention:
            memory = projected[:, 1:].contiguous()  # (B, P, F)
            memory_att = memory_factor(fast.memory_att(memory.view(b * p, -1)).view(b, p, -1))  # (B, P, A) e^(-2m)
        return DecoderState(h, cell, image_gates, memory, memory_att, fast, record_gates)

    def _with_concepts(self, image: torch.Tensor, pooled: torch.Tensor, concepts: torch.Tensor | None) -> torch.Tensor:
        """image (B, F) plus, with concept inputs, the projected confidences: outside the feature
        dropout, since the confidences are already a summary."""
        if not self.config.concepts:
            return image
        confidences = self.concept_probs(pooled) if concepts is None else concepts
        return image + self.concept_proj(confidences.to(image.dtype))

    def _layers(self, projected: torch.Tensor) -> torch.Tensor:
        """(B, L*D) -> the initial (L, B, D) state: tanh, one D-slice per layer."""
        c = self.config
        return torch.tanh(projected).view(-1, c.num_layers, c.hidden_dim).transpose(0, 1).contiguous()

    def step(
        self, tokens: torch.Tensor, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """tokens (N,) -> logits (N, V), next state, attention weights (N, P) or None."""
        fast = state.fast
        if fast is None:
            return self._advance(self.word_gates(self.embedding(tokens)), state)
        if fast.step is not None and not state.record_gates:
            logits, h, c, alpha = fast.step(
                tokens, state.h[0], state.c[0], state.image_gates, state.memory, state.memory_att, fast.score,
                fast.word_table, fast.top.parts, fast.context_gates.parts,
                None if fast.output_proj is None else fast.output_proj.parts, fast.output.parts,
                self.config.attention_dim)
            return logits, state.with_sequences(h[None], c[None]), alpha
        return self._advance(fast.word_table.index_select(0, tokens), state, fast)

    @property
    def step_runtime(self) -> str:
        """How `step` runs in inference: "torchscript" (`lstm_attention_step`, compiled) or
        "python" (other decoder shapes, GPUs, or where TorchScript cannot compile it)."""
        step = _scripted_step(self.config, self.embedding.weight.device)
        return "torchscript" if isinstance(step, torch.jit.ScriptFunction) else "python"

    def word_table(self) -> torch.Tensor:
        """(V, G): every word's embedding through layer 0's word gates, the lookup `step` does."""
        return self.word_gates(self.embedding.weight)

    @torch.no_grad()
    def graph_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `graph_step` takes as constants: the word-gate table (V, G) and the top layer's
        fused projection of h, weight (G [+ A + F], D) and bias."""
        return (self.word_table(), *self._fused_top())

    def graph_step(
        self, tokens: torch.Tensor, state: DecoderState, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """`step` as an exported graph computes it (`captioner/runtime/onnx_export.py`), with `graph_tables()`:
        the word-gate table looked up and the top layer's three projections of h in one product,
        as in inference; the same numbers as `step` up to summation order."""
        word_table, *top = tables
        output, new_state, alpha = self._recur(word_table.index_select(0, tokens), state, top=tuple(top))
        return self._logits(output), new_state, alpha

    # -- training --------------------------------------------------------------------------------

    def forward(
        self,
        regions: torch.Tensor,
        pooled: torch.Tensor,
        tokens: torch.Tensor,
        *,
        sample_prob: float = 0.0,
        fused: bool = True,
        concepts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing. regions (B, P, E), pooled (B, E); tokens (N, T) are the inputs
        (<bos> w1 ... wn, padded) of N = B*K captions, K per image, adjacent. With `sample_prob`
        > 0 (scheduled sampling), each input after the first is replaced, with that probability,
        by the model's own previous prediction. Returns logits (N, T, V) and attention weights
        (N, T, P) or None. `fused=False` computes exactly the same step by step, module by module
        (the reference the fused path is tested against). `concepts` (B, W): as in `init_state`."""
        state = self.init_state(regions, pooled, concepts, packed=False)
        k = tokens.shape[0] // pooled.shape[0]
        if k > 1:
            state = state.repeat(k)
        word_gates = self.word_gates(self.embedding(tokens))  # (N, T, G), all steps at once
        alphas = []
        if sample_prob > 0 or not fused:  # each step's logits are needed before the next step
            logits = []
            for t in range(tokens.shape[1]):
                gates = word_gates[:, t]
                if sample_prob > 0 and t > 0:
                    own = self.word_gates(self.embedding(logits[-1].detach().argmax(dim=-1)))
                    swap = torch.rand(tokens.shape[0], 1, device=tokens.device) < sample_prob
                    gates = torch.where(swap, own, gates)
                step_logits, state, alpha = self._advance(gates, state)
                logits.append(step_logits)
                alphas.append(alpha)
            stacked = torch.stack(logits, dim=1)
        else:
            # Fewer, larger products: the top layer's three projections of h in one product per
            # step, and the output layer once for all steps. Dropout is drawn in the same order as
            # step by step (self-critical training replays the sampler's masks).
            top = self._fused_top()
            outputs = []
            # unbind, not word_gates[:, t]: each indexed step's backward would fill an (N, T, G)
            # gradient of zeros to add its slice into; unbind's backward stacks the slices once.
            for step_gates in word_gates.unbind(1):
                output, state, alpha = self._recur(step_gates, state, top=top)
                outputs.append(output)
                alphas.append(alpha)
            stacked = self._logits(torch.stack(outputs, dim=1))  # (N, T, V)
        stacked_alphas = torch.stack(alphas, dim=1) if self.config.attention else None
        return stacked, stacked_alphas

    # -- internals -------------------------------------------------------------------------------

    def _fast(self) -> "_InferenceWeights | None":
        """Weights rearranged for decoding, or None while training / tracking gradients. Rebuilt
        whenever a parameter changes (loading a state dict, an optimiser step)."""
        if self.training or torch.is_grad_enabled():
            return None
        key = (self.products, *((p.data_ptr(), p._version) for p in self.parameters()))
        if self._inference is None or self._inference.key != key:
            self._inference = _InferenceWeights.build(self, key)
        return self._inference

    def _fused_top(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layer's projections of h (hidden gates, attention query, context gate) as one
        (G [+ A + F], D) weight and bias, built once per forward; gradients reach each part."""
        top = self.hidden_gates[-1]
        if not self.config.attention:
            return top.weight, top.bias
        weight = torch.cat([top.weight, self.hidden_att.weight, self.context_gate.weight])
        bias = torch.cat([top.bias, top.bias.new_zeros(self.config.attention_dim), self.context_gate.bias])
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            # Cast once per forward, as autocast does for a parameter: the concatenation is not
            # one, so autocast would cast it again at every word step (and back in the backward).
            dtype = torch.get_autocast_dtype(device)
            weight, bias = weight.to(dtype), bias.to(dtype)
        return weight, bias

    def _advance(
        self, word_gates: torch.Tensor, state: DecoderState, fast: "_InferenceWeights | None" = None
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step from the word's gate contribution (N, G); `fast` in inference."""
        output, new_state, alpha = self._recur(word_gates, state, fast)
        return self._logits(output, fast), new_state, alpha  # (N, V)

    def _recur(
        self, word_gates: torch.Tensor, state: DecoderState, fast: "_InferenceWeights | None" = None,
        top: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """The recurrence of one step: -> the top layer's output after dropout (N, D), the next
        state, attention weights (N, P) or None. `top`: `_fused_top()`'s weight and bias."""
        c = self.config
        b, k = state.image_gates.shape[0], state.group_size
        top_hidden_gates, query, gate = self._top_projections(state.h[-1], fast, top)
        gates_in = (word_gates.view(b, k, -1) + state.image_gates[:, None]).view(b * k, -1)  # (N, G)
        alpha = None
        if c.attention:
            context, alpha = self._attend(query, gate, state)  # (N, F), (N, P)
            gates_in = gates_in + (fast.context_gates(context) if fast is not None else self.context_gates(context))
        hs, cs = [], []
        layer_input = None
        for layer in range(c.num_layers):
            if layer > 0:
                gates_in = self.input_gates[layer - 1](layer_input if fast is not None else self.dropout(layer_input))
            h_prev = state.h[layer]
            c_prev = None if state.c is None else state.c[layer]
            hidden_gates = top_hidden_gates if layer == c.num_layers - 1 else self.hidden_gates[layer](h_prev)
            h_new, c_new = self._cell(gates_in, hidden_gates, h_prev, c_prev)
            hs.append(h_new)
            cs.append(c_new)
            layer_input = h_new
        gates = lstm_gates(gates_in, hidden_gates) if state.record_gates else None  # the top layer's
        if c.num_layers == 1:  # a view, not a copy
            hs, cs = hs[0][None], None if state.c is None else cs[0][None]
        else:
            hs, cs = torch.stack(hs), None if state.c is None else torch.stack(cs)
        new_state = state.with_sequences(hs, cs, gates)
        return (layer_input if fast is not None else self.dropout(layer_input)), new_state, alpha  # no dropout in inference

    def _top_projections(self, h: torch.Tensor, fast: "_InferenceWeights | None", top=None):
        """Everything computed from the top layer's previous state h (N, D): its hidden gates
        (N, G), the attention query (N, A) and the context gate's input (N, F). In inference, and
        in training with `top` (`_fused_top()`), one matrix product does all three."""
        if fast is not None or top is not None:
            projected = fast.top(h) if fast is not None else nnf.linear(h, *top)  # (N, G + A + F)
            if not self.config.attention:
                return projected, None, None
            c = self.config
            return projected.split((CELLS[c.cell] * c.hidden_dim, c.attention_dim, c.memory_dim), dim=1)
        hidden_gates = self.hidden_gates[-1](h)
        if not self.config.attention:
            return hidden_gates, None, None
        return hidden_gates, self.hidden_att(h), self.context_gate(h)

    def _logits(self, h: torch.Tensor, fast: "_InferenceWeights | None" = None) -> torch.Tensor:
        if fast is not None:
            return fast.output(fast.output_proj(h)) if self.config.tie_embeddings else fast.output(h)
        if self.config.tie_embeddings:
            return nnf.linear(self.output_proj(h), self.embedding.weight, self.output_bias)
        return self.output(h)

    def _attend(self, query: torch.Tensor, gate: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor]:
        """query (N, A), gate input (N, F) -> gated context (N, F), weights (N, P)."""
        b, k = state.memory.shape[0], state.group_size
        weights = TrainedAttentionWeights.apply if torch.is_grad_enabled() else attention_weights
        if state.fast is not None:  # inference keeps the memory's factor e^(-2m) and the query as -2q
            alpha = factored_attention_weights(state.memory_att, query.view(b, k, -1), state.fast.score)
        else:
            alpha = weights(state.memory_att, query.view(b, k, -1), self.att_score.weight[0])  # (B, K, P)
        context = torch.bmm(alpha, state.memory).view(b * k, -1)  # (N, F)
        return torch.sigmoid(gate) * context, alpha.view(b * k, -1)

    def _cell(
        self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gx, gh: (N, G) input and hidden contributions -> (h', c')."""
        kind = self.config.cell
        if kind == "lstm":
            return (self._lstm_cell if torch.is_grad_enabled() else lstm_cell)(gx, gh, c)
        if kind == "gru":
            xr, xz, xn = gx.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        return torch.tanh(gx + gh), None


def attention_weights(memory_att: torch.Tensor, query: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Additive attention weights softmax_p(w . tanh(m_p + q)): memory_att (B, P, A), query
    (B, K, A), score weight w (A,) -> (B, K, P). With tanh(z) = 2 sigmoid(2z) - 1 the -1 term adds
    the same constant to every region's score, which the softmax cancels, so this computes
    softmax(2w . sigmoid(2m + 2q)): the same function, and on CPUs the (B, K, P, A) sigmoid pass,
    most of attention's cost, is several times cheaper than tanh's."""
    energy = torch.sigmoid_((memory_att * 2)[:, None] + (query * 2)[:, :, None])  # (B, K, P, A), in place: one pass less
    b, k, p, a = energy.shape
    # In the energy's dtype (bf16 under autocast, whose CPU list leaves mv alone)
    return torch.mv(energy.view(-1, a), (score * 2).to(energy.dtype)).view(b, k, p).softmax(dim=-1)  # (B, K, P)


MEMORY_EXPONENT = 80.0  # |2m| kept below this: e^(-2m) and its reciprocal stay normal fp32 numbers


def memory_factor(memory_att_doubled: torch.Tensor) -> torch.Tensor:
    """2m (B, P, A) -> e^(-2m), what `factored_attention_weights` takes, once per image. The
    clamp keeps it finite and non-zero, so no product of it is ever 0 * inf; it changes the
    energy only where sigmoid(2m + 2q) is within e^-80 of 0 or 1 and the query would have to undo
    a saturation of 80."""
    return memory_att_doubled.clamp(-MEMORY_EXPONENT, MEMORY_EXPONENT).neg_().exp_()


def factored_attention_weights(memory_factor: torch.Tensor, query_exponent: torch.Tensor,
                               score: torch.Tensor) -> torch.Tensor:
    """`attention_weights` as decoding computes it: sigmoid(x + y) = 1 / (1 + e^-x e^-y), so with
    the memory's factor e^(-2m) (B, P, A) made once per image (`memory_factor`) and the query as
    -2q (B, K, A), the (B, K, P, A) energy is one multiply-add and a reciprocal instead of an add
    and a sigmoid, whose exponential was most of attention's cost (16 images, 3 beams: 0.21
    against 0.38 ms a step on one core). The same function up to rounding (a few fp32 ulps).
    score: the doubled weight 2w (A,) -> (B, K, P)."""
    one = memory_factor.new_ones(())
    energy = torch.addcmul(one, memory_factor[:, None], query_exponent.exp()[:, :, None]).reciprocal_()
    b, k, p, a = energy.shape
    return torch.mv(energy.view(-1, a), score.to(energy.dtype)).view(b, k, p).softmax(dim=-1)  # (B, K, P)


class TrainedAttentionWeights(torch.autograd.Function):
    """`attention_weights` where gradients are tracked, with a hand-written backward: autograd's
    (and torch.compile's) makes several passes over the (B, K, P, A) energy and sums it over K
    and over P elementwise; here the energy's derivative e(1 - e) is formed once and the sums over
    P and over the rows are matrix products (2 AVX2 cores: 1.3x less time than the compiled pair).
    The same function and gradients up to rounding (tested with gradcheck)."""

    @staticmethod
    def forward(ctx, memory_att: torch.Tensor, query: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        energy = torch.sigmoid_((memory_att * 2)[:, None] + (query * 2)[:, :, None])  # (B, K, P, A)
        alpha = torch.matmul(energy, (score * 2).to(energy.dtype)).softmax(dim=-1)  # (B, K, P)
        ctx.save_for_backward(energy, alpha, score)
        ctx.dtypes = memory_att.dtype, query.dtype
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha: torch.Tensor):
        energy, alpha, score = ctx.saved_tensors
        b, k, p, a = energy.shape
        grad_alpha = grad_alpha.to(alpha.dtype)
        grad_logit = (alpha * (grad_alpha - (grad_alpha * alpha).sum(-1, keepdim=True))).to(energy.dtype)  # (B, K, P)
        grad_score = 2 * torch.mm(grad_logit.reshape(1, -1), energy.reshape(-1, a))[0]  # (A,)
        slope = torch.addcmul(energy, energy, energy, value=-1)  # sigmoid's derivative e(1 - e)
        weighted = torch.bmm(grad_logit.reshape(b * k, 1, p), slope.view(b * k, p, a)).view(b, k, a)  # sum over P
        per_region = slope.new_zeros(b, p, a)
        for i in range(k):  # sum over the K sequences of each image, one (B, P, A) pass each
            per_region.addcmul_(grad_logit[:, i, :, None], slope[:, i])
        outer = (4 * score).to(energy.dtype)  # d/dz of 2w . sigmoid(2z)
        memory_dtype, query_dtype = ctx.dtypes
        return (per_region * outer).to(memory_dtype), (weighted * outer).to(query_dtype), grad_score.to(score.dtype)


GATES = ("i", "f", "g", "o")  # the order of `lstm_gates`' second axis


def lstm_gates(gx: torch.Tensor, gh: torch.Tensor) -> torch.Tensor:
    """The activations `lstm_cell` computes: gx, gh (N, 4D) -> (N, 4, D) input, forget, cell
    candidate and output gates (i, f, g, o)."""
    i, f, g, o = (gx + gh).chunk(4, dim=1)
    return torch.stack([torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)], dim=1)


def lstm_cell(gx: torch.Tensor, gh: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM gates: gx, gh (N, 4D) input and hidden contributions, c (N, D) -> (h', c'). One
    sigmoid over all four gates (the cell candidate's quarter unused): decoding runs this on a
    few rows, where each operation's dispatch costs more than its arithmetic."""
    z = gx + gh
    i, f, _, o = torch.sigmoid(z).chunk(4, dim=1)
    d = c.shape[1]
    c = torch.addcmul(f * c, i, torch.tanh(z[:, 2 * d:3 * d]))
    return o * torch.tanh(c), c


def lstm_attention_step(tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor, image_gates: torch.Tensor,
                        memory: torch.Tensor, memory_factor: torch.Tensor, score: torch.Tensor,
                        word_table: torch.Tensor, top: ProductParts, context_gates: ProductParts,
                        output_proj: Optional[ProductParts], output: ProductParts,
                        attention_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Decoder.step` in inference for one LSTM layer with attention, the default decoder, as
    one function for TorchScript (`captioner.scripting`): the same operations as `_recur` and
    `_logits` with `_InferenceWeights`. tokens (N,), h and c (N, D), image_gates (B, G), memory
    (B, P, F), memory_factor (B, P, A) e^(-2m), score (A,) 2w, word_table (V, G), the products'
    parts -> logits (N, V), h', c' (N, D), attention weights (N, P)."""
    b, g = image_gates.shape[0], image_gates.shape[1]
    k = h.shape[0] // b
    projected = product(h, top)  # (N, G + A + F): hidden gates, the query as -2q, the context gate's input
    hidden_gates, query, gate = projected[:, :g], projected[:, g:g + attention_dim], projected[:, g + attention_dim:]
    gates_in = (word_table.index_select(0, tokens).view(b, k, -1) + image_gates[:, None]).view(b * k, -1)
    alpha = factored_attention_weights(memory_factor, query.view(b, k, -1), score)  # (B, K, P)
    context = torch.bmm(alpha, memory).view(b * k, -1)  # (N, F)
    gates_in = gates_in + product(torch.sigmoid(gate) * context, context_gates)
    h, c = lstm_cell(gates_in, hidden_gates, c)
    features = h if output_proj is None else product(h, output_proj)
    return product(features, output), h, c, alpha.view(b * k, -1)


def _scripted_step(config: DecoderConfig, device: torch.device) -> Callable | None:
    """`lstm_attention_step` (scripted where TorchScript compiles it) for the decoders it
    computes, one LSTM layer with attention, on the CPU; None for the others, which step in
    `_recur`. Not on GPUs, where TorchScript's fuser is on and may generate its own kernels for
    the elementwise work, which need not round as the eager step does (not measured: no GPU)."""
    if config.cell == "lstm" and config.num_layers == 1 and config.attention and device.type == "cpu":
        return scripted(lstm_attention_step)
    return None


@dataclass
class _InferenceWeights:
    """Decoding-time copies: the top layer's three projections of h fused into one, the
    projections packed for small batches, and the word-gate table."""

    key: tuple
    word_table: torch.Tensor  # (V, G): embedding followed by layer 0's word gates
    top: Projection  # D -> G [+ A + F]
    context_gates: Projection | None  # F -> G
    output_proj: Projection | None  # D -> E
    output: Projection  # E or D -> V
    feature_proj: Projection  # E -> F, once per image (and region)
    init: Projection  # F -> L*D [+ L*D] [+ G]: init_h, init_c and the image's gates in one product
    memory_att: Projection | None  # F -> A, doubled (2m)
    score: torch.Tensor | None  # (A,) the attention score weight, doubled
    step: Callable | None  # `lstm_attention_step`, scripted, where the decoder is one LSTM layer with attention

    @classmethod
    @torch.no_grad()
    def build(cls, decoder: Decoder, key: tuple) -> "_InferenceWeights":
        c, products = decoder.config, decoder.products
        top = decoder.hidden_gates[-1]
        weights, biases = [top.weight], [top.bias]
        if c.attention:  # the query as -2q: see `factored_attention_weights`
            weights += [decoder.hidden_att.weight * -2, decoder.context_gate.weight]
            biases += [torch.zeros(c.attention_dim, device=top.bias.device), decoder.context_gate.bias]
        if c.tie_embeddings:
            output_proj = Projection(decoder.output_proj.weight, None, products)
            output = Projection(decoder.embedding.weight, decoder.output_bias, products)
        else:
            output_proj, output = None, Projection(decoder.output.weight, decoder.output.bias, products)
        starts = [decoder.init_h] + ([decoder.init_c] if decoder.init_c is not None else []) + [decoder.image_gates]
        return cls(
            key=key,
            word_table=decoder.word_table(),
            top=Projection(torch.cat(weights), torch.cat(biases), products),
            context_gates=Projection(decoder.context_gates.weight, None, products) if c.attention else None,
            output_proj=output_proj,
            output=output,
            feature_proj=Projection(decoder.feature_proj.weight, decoder.feature_proj.bias, products),
            init=Projection(torch.cat([m.weight for m in starts]), torch.cat([m.bias for m in starts]), products),
            memory_att=Projection(decoder.memory_att.weight * 2, decoder.memory_att.bias * 2, products)
            if c.attention else None,
            score=decoder.att_score.weight[0] * 2 if c.attention else None,
            step=_scripted_step(c, top.weight.device),
        )

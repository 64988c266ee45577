"""Training: teacher forcing with cross-entropy, validated by real decoding.

    captioner train --config training/configs/flickr8k.yaml --optim.lr=5e-4
    torchrun --nproc_per_node=2 -m training.train --config ...   # DistributedDataParallel

`main(cfg)` runs a whole training; `train_one_epoch` and `evaluate` are the pieces. A run folder
holds `config.yaml`, `last.pt` (with the optimiser, schedule, RNG and data position, written every
`run.checkpoint_every_steps` and at each epoch's end), `best.pt` (best validation CIDEr-D),
`metrics.jsonl`, TensorBoard logs and `curves.png`. `--resume` continues from `last.pt` and ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner.checkpoint import load_checkpoint, write_checkpoint
from captioner.decoder import Decoder, DecoderConfig
from captioner.decoding import DecodeConfig, generate
from captioner.encoder import Encoder
from captioner.preprocessing import Preprocessing
from captioner.runtime.cpu import keep_freed_memory, native_bf16
from captioner.tagger import Tagger
from captioner.vocab import Vocabulary

from . import features
from .config import TrainConfig, config_from_dict, load_config
from .batches import CaptionBatches
from .data import Sample, load_dataset
from .metrics import caption_metrics, diversity
from .losses import token_cross_entropy
from .scst import SelfCritical
from .text import TextBatches, TextConcepts, read_corpora

log = logging.getLogger("captioner.train")


@dataclasses.dataclass
class Progress:
    """Where a run is; saved in `last.pt`."""

    epoch: int = 0
    batches_done: int = 0  # in the current epoch
    step: int = 0  # optimiser steps so far
    best_cider: float = -1.0
    best_epoch: int = -1
    history: list = dataclasses.field(default_factory=list)


class CaptionModel(torch.nn.Module):
    """Encoder + decoder for training: inputs are cached regions (B, P, E) float, pixels
    (B, 3, S, S) uint8 that go through the encoder (frozen, or fine-tuning its last stages), or
    with `split=N` the cached output of the encoder's frozen part (B, h*w, C) float, which goes
    through its last N stages (`Encoder.split`) only."""

    def __init__(self, encoder: Encoder, decoder: Decoder, preprocessing, split: int = 0):
        super().__init__()
        self.encoder, self.decoder, self.preprocessing = encoder, decoder, preprocessing
        self.top, self.trunk_grid = None, None
        if split:
            frozen, self.top = encoder.split(split)
            size = preprocessing.size
            with torch.no_grad():
                probe = frozen(torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device))
            self.trunk_grid = tuple(probe.shape[2:])  # (h, w)

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> regions (B, P, E), pooled (B, E)."""
        if inputs.dtype == torch.uint8:
            pixels = self.preprocessing.normalize(inputs).contiguous(memory_format=torch.channels_last)
            return self.encoder(pixels)
        if self.top is not None:
            b, _, c = inputs.shape
            trunk = inputs.view(b, *self.trunk_grid, c).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last
            regions = self.top(trunk).flatten(2).transpose(1, 2)  # (B, P, E)
            return regions, regions.mean(dim=1)
        return inputs, inputs.mean(dim=1)

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, sample_prob: float = 0.0,
                text_tokens: torch.Tensor | None = None, text_concepts: torch.Tensor | None = None):
        """-> logits (N, T, V), attention (N, T, P) or None, and for captions without photos
        `text_tokens` (M, T'), their logits (M, T', V) or None. One forward for both, so that
        DistributedDataParallel sees one pass per step. `text_concepts` (M, W): their concept
        confidences, for decoders with concept inputs."""
        regions, pooled = self.encode(inputs)
        logits, alphas = self.decoder(regions, pooled, tokens, sample_prob=sample_prob)
        text_logits = None
        if text_tokens is not None:  # the image input absent: one all-zero region, one "image" per caption
            absent = regions.new_zeros(text_tokens.shape[0], 1, regions.shape[-1])  # (M, 1, E)
            text_logits, _ = self.decoder(absent, absent[:, 0], text_tokens, concepts=text_concepts)
        return logits, alphas, text_logits


# -- the training step ------------------------------------------------------------------------

def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor | None, targets: torch.Tensor, pad_id: int,
    *, label_smoothing: float, attention_reg: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens, plus doubly stochastic attention regularisation
    (Show, Attend and Tell, eq. 14): each region should receive about one unit of attention over
    the caption. logits (N, T, V), alphas (N, T, P), targets (N, T). Returns (loss, ce)."""
    ce = token_cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id,
                             label_smoothing=label_smoothing)
    loss = ce
    if alphas is not None and attention_reg > 0:
        mask = (targets != pad_id).unsqueeze(-1).to(alphas.dtype)  # (N, T, 1)
        coverage = (alphas * mask).sum(dim=1)  # (N, P)
        loss = loss + attention_reg * ((1.0 - coverage) ** 2).mean()
    return loss, ce


def train_one_epoch(
    ctx: "Context", progress: Progress, *, time_left: float | None = None,
) -> dict[str, float]:
    """One pass over the training images from `progress.batches_done` on. Returns mean loss."""
    cfg, world, rank = ctx.cfg, ctx.world, ctx.rank
    order = epoch_order(ctx.set_sizes, torch.Generator().manual_seed(cfg.run.seed * 1000 + progress.epoch))
    per_rank = max(1, cfg.optim.batch_images // world)
    global_batch = per_rank * world
    batches = [order[i: i + global_batch].tolist() for i in range(0, len(order) - global_batch + 1, global_batch)]
    ctx.prepare_epoch(progress.epoch)
    sampling = _scheduled_sampling(cfg, progress.epoch)
    ctx.decoder.train()
    # Frozen stages stay in eval mode. On the cached frozen trunk the top keeps its batch-norm
    # statistics too (eval mode, only weights learn): it then computes what inference computes.
    ctx.encoder.train(not ctx.split)
    totals: dict[str, float] = {}
    count = 0
    started = time.monotonic()
    bar = tqdm(total=len(batches), initial=progress.batches_done, desc=f"epoch {progress.epoch + 1}",
               disable=not (cfg.run.progress and rank == 0), unit="batch")
    while progress.batches_done < len(batches):
        index = progress.batches_done
        images = batches[index][rank * per_rank: (rank + 1) * per_rank]
        # The caption draw depends only on (seed, epoch, batch, rank): resumable exactly.
        generator = torch.Generator().manual_seed(hash((cfg.run.seed, progress.epoch, index, rank)) % (2 ** 62))
        if ctx.self_critical is not None:
            loss, figures = _self_critical_loss(ctx, images, generator)
        else:
            loss, figures = _cross_entropy_loss(ctx, images, generator, sampling)
        (loss / cfg.optim.accumulation).backward()
        progress.batches_done += 1
        if progress.batches_done % cfg.optim.accumulation == 0 or progress.batches_done == len(batches):
            torch.nn.utils.clip_grad_norm_(ctx.parameters(), cfg.optim.grad_clip)
            ctx.optimizer.step()
            ctx.scheduler.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            progress.step += 1
        figures["loss"] = loss.item()
        for key, value in figures.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in figures.items()}, lr=f"{ctx.scheduler.get_last_lr()[0]:.2e}")
        if cfg.run.checkpoint_every_steps and progress.batches_done % cfg.run.checkpoint_every_steps == 0 \
                and progress.batches_done < len(batches):
            ctx.save_last(progress)
        if time_left is not None and time.monotonic() - started > time_left:
            break
    bar.close()
    means = {f"train_{k}": v / max(count, 1) for k, v in totals.items()}
    return {**means, "epoch_complete": progress.batches_done >= len(batches)}


def epoch_order(sets: list[tuple[int, float]], generator: torch.Generator) -> torch.Tensor:
    """One epoch's image indices, shuffled: for training sets of (size, weight) laid end to end,
    each set's images `weight` times, the fraction of a time a random subset of them."""
    picks, start = [], 0
    for size, weight in sets:
        whole, part = divmod(weight, 1.0)
        picks += [torch.arange(start, start + size)] * int(whole)
        extra = round(part * size)
        if extra:
            picks.append(start + torch.randperm(size, generator=generator)[:extra])
        start += size
    order = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
    return order[torch.randperm(len(order), generator=generator)]


def epoch_length(sets: list[tuple[int, float]]) -> int:
    return sum(int(weight // 1) * size + round(weight % 1 * size) for size, weight in sets)


def _cross_entropy_loss(ctx: "Context", images: list[int], generator: torch.Generator, sampling: float):
    """Teacher forcing on K captions per image. -> (loss, {"ce": ...})."""
    inputs, tokens = ctx.items.batch(images, ctx.cfg.data.captions_per_image, generator)
    if ctx.compiled:  # one caption length, so torch.compile builds one graph instead of one per length
        longest = ctx.cfg.model.max_caption_tokens + 2  # with <bos> and <eos>
        tokens = nnf.pad(tokens, (0, longest - tokens.shape[1]), value=ctx.vocab.pad_id)
    inputs, tokens = inputs.to(ctx.device), tokens.to(ctx.device)
    text, text_concepts = _text_batch(ctx, generator)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
        logits, alphas, text_logits = ctx.model(inputs, tokens[:, :-1], sample_prob=sampling,
                                                text_tokens=None if text is None else text[:, :-1],
                                                text_concepts=text_concepts)
    loss, ce = caption_loss(logits.float(), None if alphas is None else alphas.float(), tokens[:, 1:],
                            ctx.vocab.pad_id, label_smoothing=ctx.cfg.optim.label_smoothing,
                            attention_reg=ctx.cfg.optim.attention_reg)
    return _with_text_loss(ctx, loss, text, text_logits, {"ce": ce.item()})


def _text_batch(ctx: "Context", generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch of captions without photos (drawn after the photo batch, from the same generator)
    -> tokens (M, T) or None, and for decoders with concept inputs their concepts (M, W)."""
    if ctx.text is None or ctx.cfg.optim.text_batch <= 0:
        return None, None
    text = ctx.text.batch(ctx.cfg.optim.text_batch, generator).to(ctx.device)
    return text, None if ctx.text_concepts is None else ctx.text_concepts(text, generator)


def _with_text_loss(ctx: "Context", loss: torch.Tensor, text: torch.Tensor | None,
                    text_logits: torch.Tensor | None, figures: dict[str, float]):
    """loss + text_weight x the language-model cross-entropy of the captions without photos."""
    if text is None:
        return loss, figures
    text_ce = token_cross_entropy(text_logits.float().flatten(0, 1), text[:, 1:].flatten(), ignore_index=ctx.vocab.pad_id)
    return loss + ctx.cfg.optim.text_weight * text_ce, {**figures, "text_ce": text_ce.item()}


def _self_critical_loss(ctx: "Context", images: list[int], generator: torch.Generator):
    """Sample K captions per image, reward them with CIDEr-D. -> (loss, {"reward": mean})."""
    images, inputs = ctx.items.inputs(images, generator)
    inputs = inputs.to(ctx.device)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    # Sample with dropout on, then replay the same dropout masks in the gradient pass (the
    # draws come in the same order and shapes), so the gradient is for the policy that sampled.
    dropout_rng = _rng_state(ctx.device)
    # Sampled under the gradient pass's autocast: the same arithmetic for the policy that samples
    # and the one differentiated, and on bf16 hardware the sampling's matrix products at bf16 speed.
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
        regions, pooled = ctx.network.encode(inputs)
        hypotheses = ctx.self_critical.sample(ctx.decoder, regions, pooled, seed)
    advantages, reward = ctx.self_critical.advantages(images, hypotheses)
    sequences, targets = ctx.self_critical.sequences(hypotheses)
    text, text_concepts = _text_batch(ctx, generator)
    _set_rng_state(ctx.device, dropout_rng)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
        # The photo pass draws its dropout first, so the replayed masks are the sampler's.
        logits, _, text_logits = ctx.model(inputs, sequences.to(ctx.device),
                                           text_tokens=None if text is None else text[:, :-1],
                                           text_concepts=text_concepts)
    loss = ctx.self_critical.loss(logits, targets.to(ctx.device), advantages)
    return _with_text_loss(ctx, loss, text, text_logits, {"reward": reward})


def _scheduled_sampling(cfg: TrainConfig, epoch: int) -> float:
    if cfg.optim.scheduled_sampling <= 0:
        return 0.0
    return cfg.optim.scheduled_sampling * min(1.0, epoch / max(1, cfg.optim.epochs - 1))


# -- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(
    captions_of: Callable[[list[int]], list[str]], samples: list[Sample], *, batch_size: int = 50,
    meteor: bool = True, progress: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Caption `samples` with real decoding (not teacher forcing) and score them.
    `captions_of(indices)` gives those samples' top captions. Returns (metrics, captions)."""
    predictions: dict[str, str] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc="validating", disable=not progress, unit="batch"):
        chunk = list(range(start, min(start + batch_size, len(samples))))
        for i, caption in zip(chunk, captions_of(chunk)):
            predictions[samples[i].image_id] = caption
    references = {s.image_id: s.captions for s in samples}
    metrics = caption_metrics(predictions, references, meteor=meteor)
    metrics.update(diversity(predictions))
    return metrics, predictions


def validate(ctx: "Context") -> dict[str, float]:
    """Decode and score each validation set -> {"val_<set>_<metric>": ...}, and the selection
    score `val_CIDEr-D`: the sets' CIDEr-D weighted by their `weight`."""
    cfg = ctx.cfg
    record: dict[str, float] = {}
    total = sum(spec.weight for spec, _ in ctx.val_sets)
    score = 0.0
    for spec, samples in ctx.val_sets:
        regions_of = lambda indices, samples=samples: ctx.val_regions([samples[i].image for i in indices])  # noqa: E731
        captions_of = decoder_captions(ctx.decoder, ctx.vocab, regions_of, cfg.eval.decode)
        metrics, _ = evaluate(captions_of, samples, meteor=cfg.eval.meteor, progress=cfg.run.progress)
        record.update({f"val_{spec.label}_{k}": v for k, v in metrics.items()})
        score += spec.weight / total * metrics["CIDEr-D"]
    record["val_CIDEr-D"] = score
    return record


def decoder_captions(decoder: Decoder, vocab: Vocabulary, regions_of, decode: DecodeConfig):
    """`captions_of` for `evaluate` from a bare decoder: `regions_of(indices) -> (B, P, E)`."""
    def captions_of(indices: list[int]) -> list[str]:
        decoder.eval()
        regions = regions_of(indices)
        hyps = generate(decoder, regions, regions.mean(dim=1), decode, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                        banned_ids=vocab.never_generated)
        return [vocab.decode(h[0].tokens) for h in hyps]
    return captions_of


# -- the run ------------------------------------------------------------------------------------

class Context:
    """Everything a run holds: model parts, data, optimiser, schedule, distributed setup."""

    def __init__(self, cfg: TrainConfig, resume_payload: dict | None):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
        # bf16 autocast where the hardware computes bf16 natively (on other CPUs it is emulated, slower).
        self.amp = cfg.run.amp and (self.device.type == "cuda" or (self.device.type == "cpu" and native_bf16()))
        if self.device.type == "cpu":
            keep_freed_memory(one_arena=True)  # the step's large tensors reuse pages instead of faulting them in anew
        self.out = Path(cfg.run.out_dir)

        train_sets = [(spec, load_dataset(spec, cfg.data.train_split)) for spec in cfg.data.train]
        self.train_samples = [s for _, samples in train_sets for s in samples]
        self.val_sets = [(spec, load_dataset(spec, cfg.data.val_split)[: cfg.eval.max_images or None])
                         for spec in cfg.data.val]
        self.val_samples = [s for _, samples in self.val_sets for s in samples]
        # The model's starting point: a run being resumed, a checkpoint to fine-tune, or nothing.
        init = None if resume_payload is not None or not cfg.model.init_from else load_checkpoint(cfg.model.init_from)
        source = resume_payload or init
        # What a fine-tuned model started from, kept in its checkpoints (and across resumes).
        self.init_provenance = (resume_payload["provenance"].get("init_from") if resume_payload is not None
                                else init and {"path": str(cfg.model.init_from), "provenance": init.get("provenance", {})})
        encoder_config = dataclasses.replace(cfg.model.encoder, trainable_stages=0)
        if source is not None:
            self.vocab = Vocabulary.from_dict(source["vocabulary"])
            encoder_config = dataclasses.replace(encoder_config, backbone=source["encoder"]["backbone"])
        text_captions = read_corpora(cfg.data.text)
        if source is None:  # from the training data only: the training split's captions and the text corpora
            self.vocab = Vocabulary.build([*(c for s in self.train_samples for c in s.captions), *text_captions],
                                          cfg.model.min_word_count)
        self.text = TextBatches(text_captions, self.vocab, cfg.model.max_caption_tokens) if text_captions else None

        self.encoder = Encoder(encoder_config)
        self.preprocessing = dataclasses.replace(self.encoder.native_preprocessing, resize=cfg.model.resize)
        settings = dataclasses.asdict(cfg.model.decoder)
        add_concepts = settings.pop("concepts")
        concept_tagger = settings.pop("concept_tagger")
        if source is not None:
            self.preprocessing = Preprocessing.from_dict(source["preprocessing"])
            decoder_config = DecoderConfig.from_dict({**source["decoder"], "dropout": cfg.model.decoder.dropout})
        else:
            decoder_config = DecoderConfig(vocab_size=len(self.vocab), feature_dim=self.encoder.feature_dim,
                                           **settings)
        tagger = None
        if add_concepts or decoder_config.concepts:
            tagger = _concept_tagger(concept_tagger, encoder_config.backbone)
            concepts = {"concepts": len(tagger.words), "concept_classes": len(tagger.class_names),
                        "concept_activation": tagger.activation}
            if decoder_config.concepts and concepts != {k: getattr(decoder_config, k) for k in concepts}:
                raise ValueError(f"the checkpoint's concept head is not {concept_tagger or 'the ImageNet tagger'}'s: "
                                 "set model.decoder.concept_tagger to the tagger file it was trained with")
            decoder_config = dataclasses.replace(decoder_config, **concepts)
        torch.manual_seed(cfg.run.seed)
        self.decoder = Decoder(decoder_config)
        if tagger is not None:
            self.decoder.set_concept_head(tagger)
        if source is not None:
            state = source["state_dict"]
            _load_encoder(self.encoder, {k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
            _load_decoder(self.decoder, {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}, tagger)
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        self.text_concepts = None if tagger is None else TextConcepts(self.vocab, tagger.words, tagger.forms)

        # Frozen encoder: features come from the cache, encoded once (on rank 0 first).
        # Fine-tuning the last N stages (from optim.finetune_from_epoch): the cache holds the frozen
        # part's output and each step runs only those stages on it (`split`).
        # data.use_cache=false: pixels go through the whole encoder.
        stages = cfg.model.encoder.trainable_stages
        self.finetune_from = cfg.optim.finetune_from_epoch if stages > 0 else -1
        self.split = stages if self.finetune_from >= 0 and cfg.data.use_cache else 0
        self.finetuning = False
        self.items = self.val_cache = None
        if cfg.data.use_cache:  # a cache per data set and view
            views = features.FeatureViews([
                features.CacheUnion([self._cache([s.image for s in samples], view) for _, samples in train_sets])
                for view in range(cfg.data.cache_views)])
            self.val_cache = features.CacheUnion([self._cache([s.image for s in samples]) for _, samples in self.val_sets])
            train_sets = [(spec, [s for s in samples if views.usable(s.image)]) for spec, samples in train_sets]
            dropped = len(self.train_samples) - sum(len(samples) for _, samples in train_sets)
            if dropped:
                log.warning("%d images could not be read when caching and are left out", dropped)
            self.train_samples = [s for _, samples in train_sets for s in samples]
            self.items = CaptionBatches(self.train_samples, self.vocab, cfg.model.max_caption_tokens, cache=views)
        else:
            self.items = CaptionBatches(self.train_samples, self.vocab, cfg.model.max_caption_tokens,
                                        preprocessing=self.preprocessing)
        if cfg.optim.objective not in ("xe", "scst"):
            raise ValueError(f"optim.objective must be 'xe' or 'scst', not {cfg.optim.objective!r}")
        if cfg.optim.objective != "scst" and (cfg.optim.scst_object_weight or cfg.optim.scst_object_penalty
                                              or cfg.optim.scst_scene_penalty):
            raise ValueError("optim.scst_object_weight, optim.scst_object_penalty and optim.scst_scene_penalty "
                             "need optim.objective=scst")
        self.self_critical = None
        if cfg.optim.objective == "scst":
            self.self_critical = SelfCritical(self.vocab, self.items.references, samples=cfg.optim.scst_samples,
                                              max_new_tokens=cfg.eval.decode.max_new_tokens,
                                              object_weight=cfg.optim.scst_object_weight,
                                              object_penalty=cfg.optim.scst_object_penalty,
                                              scene_penalty=cfg.optim.scst_scene_penalty)
        self.network = CaptionModel(self.encoder, self.decoder, self.preprocessing, split=self.split)
        self.model = self._wrap()
        encoder_params = [p for stage in self.encoder.stages[len(self.encoder.stages) - stages:]
                          for p in stage.parameters()] if self.finetune_from >= 0 else []
        groups = [{"params": list(self.decoder.parameters()), "lr": cfg.optim.lr}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": cfg.optim.encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.set_sizes = [(len(samples), spec.weight) for spec, samples in train_sets]  # for epoch_order
        per_rank = max(1, cfg.optim.batch_images // self.world)
        self.batches_per_epoch = epoch_length(self.set_sizes) // (per_rank * self.world)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.optim.accumulation)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg, steps_per_epoch * cfg.optim.epochs))
        # The training RNG stream (dropout, scheduled sampling) starts from a known state, whatever
        # setup consumed (building a cache does), and differs between ranks.
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        if resume_payload is not None:
            training = resume_payload["training"]
            self.optimizer.load_state_dict(training["optimizer"])
            self.scheduler.load_state_dict(training["scheduler"])
            torch.set_rng_state(training["rng"])

    def _wrap(self) -> torch.nn.Module:
        model: torch.nn.Module = self.network
        if self.world > 1:
            model = DistributedDataParallel(model)
        # Not for self-critical training: its gradient pass replays the eager sampler's dropout
        # masks, which compiled dropout would not draw alike.
        self.compiled = self.cfg.run.compile and self.device.type == "cuda" and self.self_critical is None
        if self.compiled:
            model = torch.compile(model)
        elif self.cfg.run.compile:
            log.warning("run.compile ignored: it needs CUDA and the cross-entropy objective")
        if self.cfg.run.compile_elementwise and self.device.type == "cpu":
            compiler = os.environ.get("CXX", "g++")
            if shutil.which(compiler):
                self.decoder.compile_elementwise()
            else:
                log.warning("run.compile_elementwise ignored: torch.compile needs a C++ compiler (%s not found)", compiler)
        return model

    def prepare_epoch(self, epoch: int) -> None:
        """Switch to encoder fine-tuning when its epoch comes: unfreeze the last stages (on the
        cached frozen trunk, or without a cache on augmented pixels)."""
        if self.finetuning or self.finetune_from < 0 or epoch < self.finetune_from:
            return
        self.finetuning = True
        self.encoder.set_trainable_stages(self.cfg.model.encoder.trainable_stages)
        if not self.split:
            self.items = CaptionBatches(self.train_samples, self.vocab, self.cfg.model.max_caption_tokens,
                                        preprocessing=self.preprocessing, augment=True)
        self.model = self._wrap()  # DDP must see the newly trainable parameters
        log.info("epoch %d: fine-tuning the encoder's last %d stages", epoch + 1, self.cfg.model.encoder.trainable_stages)

    def _cache(self, paths: list[Path], view: int = 0) -> features.FeatureCache:
        def build() -> features.FeatureCache:
            return features.build_or_load(self.encoder, self.preprocessing, paths, self.cfg.data.cache_dir,
                                          workers=self.cfg.data.workers, progress=self.cfg.run.progress, view=view,
                                          split=self.split)
        if self.world > 1:
            if self.rank == 0:
                build()
            dist.barrier()
        return build()

    def parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def val_regions(self, paths: list[Path]) -> torch.Tensor:
        """(B, P, E) regions of validation photos."""
        if self.val_cache is not None and (self.split or not self.finetuning):
            cached = self.val_cache.regions(paths).to(self.device)
            if not self.split:
                return cached
            self.encoder.eval()
            with torch.no_grad():
                return self.network.encode(cached)[0]
        pixels = torch.stack([self.preprocessing.load(p) for p in paths]).to(self.device)
        self.encoder.eval()
        return self.encoder.extract(self.preprocessing.normalize(pixels))[0].clone()

    def save(self, path: Path, progress: Progress, metrics: dict | None = None, *,
             training: dict[str, Any] | None = None) -> None:
        provenance = {
            "config": self.cfg.to_dict(),
            "train_images": len(self.items),
            "epochs_completed": progress.epoch + progress.batches_done / max(1, self.batches_per_epoch),
            "step": progress.step,
            "metrics": metrics or {},
            "init_from": self.init_provenance,
            "torch": str(torch.__version__),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_checkpoint(path, self.encoder, self.decoder, self.vocab, self.preprocessing, provenance=provenance,
                         training=training)

    def save_last(self, progress: Progress) -> None:
        """last.pt, with the state to resume from (optimiser, schedule, RNG, progress)."""
        if self.rank != 0:
            return
        self.save(self.out / "last.pt", progress, training={
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "progress": dataclasses.asdict(progress),
        })


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _load_decoder(decoder: Decoder, state: dict[str, torch.Tensor], tagger: Tagger | None) -> None:
    """A checkpoint's decoder weights. A model given concept inputs to fine-tune keeps its fresh
    concept projection and head (the checkpoint has none); a checkpoint's own head must map the
    classes to the words of `tagger`, the mapping that the text concepts are made with."""
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    added = {k for k in decoder.state_dict() if k.startswith("concept")}
    if unexpected or (missing and set(missing) != added):
        raise ValueError(f"decoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tagger is not None and not missing:
        if not torch.equal(tagger.word_matrix().to(decoder.concept_words.device), decoder.concept_words):
            raise ValueError("the checkpoint's concept words are not those of the concept tagger")


def _concept_tagger(path: str | None, backbone: str) -> Tagger:
    """The decoder's concept head: the encoder's ImageNet tagger, or a tagger file of word
    detectors (`model.decoder.concept_tagger`), trained on the same encoder's pooled features."""
    if path is None:
        return Tagger.imagenet(backbone)
    try:
        tagger = Tagger.load(path)
    except ValueError as error:
        raise ValueError(f"model.decoder.concept_tagger: {error}") from error
    if tagger.backbone != backbone:
        raise ValueError(f"model.decoder.concept_tagger: {path} scores {tagger.backbone}'s features, "
                         f"the encoder is {backbone}")
    return tagger


def _load_encoder(encoder: Encoder, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's encoder weights, unless they are the pretrained ones rounded to fp16
    (an exported model with a frozen encoder): then the exact pretrained weights stay, and with
    them the feature cache."""
    current = encoder.state_dict()
    rounded = all(v.dtype == current[k].dtype and torch.equal(v.half(), current[k].half())
                  if v.is_floating_point() else torch.equal(v, current[k]) for k, v in state.items())
    if not rounded:
        encoder.load_state_dict(state)


def _schedule(cfg: TrainConfig, total_steps: int):
    warmup, floor = max(cfg.optim.warmup_steps, 0), cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def main(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train; returns the best validation metrics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.run.device != "cpu" else "gloo")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out = Path(cfg.run.out_dir)
    payload = None
    if resume and (out / "last.pt").is_file():
        payload = load_checkpoint(out / "last.pt")
        saved_cfg = config_from_dict(payload["provenance"]["config"])
        cfg = dataclasses.replace(saved_cfg, run=cfg.run)  # the run's own settings, today's run options
    ctx = Context(cfg, payload)
    progress = Progress(**payload["training"]["progress"]) if payload else Progress()
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        start = ("resuming" if payload else f"starting from {cfg.model.init_from}" if cfg.model.init_from
                 else "from scratch")
        log.info("vocabulary %d words; %d training images, %d validation images; %s",
                 len(ctx.vocab), len(ctx.items), len(ctx.val_samples), start)
    writer = _tensorboard(out) if ctx.rank == 0 else None
    deadline = None if cfg.run.time_budget_minutes is None else time.monotonic() + 60 * cfg.run.time_budget_minutes
    stale = 0
    while progress.epoch < cfg.optim.epochs:
        time_left = None if deadline is None else deadline - time.monotonic()
        started = time.monotonic()
        result = train_one_epoch(ctx, progress, time_left=time_left)
        if not result.pop("epoch_complete"):
            ctx.save_last(progress)
            log.info("time budget reached in epoch %d; resume with --resume", progress.epoch + 1)
            break
        record: dict[str, Any] = {"epoch": progress.epoch + 1, "step": progress.step, **result,
                                  "epoch_seconds": round(time.monotonic() - started, 1)}
        if ctx.rank == 0 and (progress.epoch + 1) % cfg.eval.every_epochs == 0:
            metrics = validate(ctx)
            record.update(metrics)
            if metrics["val_CIDEr-D"] > progress.best_cider:
                progress.best_cider, progress.best_epoch = metrics["val_CIDEr-D"], progress.epoch + 1
                finished = dataclasses.replace(progress, epoch=progress.epoch + 1, batches_done=0)
                ctx.save(out / "best.pt", finished, metrics)
                stale = 0
            else:
                stale += 1
        progress.history.append(record)
        progress.epoch += 1
        progress.batches_done = 0
        ctx.save_last(progress)
        if ctx.rank == 0:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, progress.epoch)
            log.info("epoch %d: %s", progress.epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        if cfg.eval.patience and stale >= cfg.eval.patience:
            log.info("no better CIDEr-D for %d epochs: stopping", stale)
            break
        if deadline is not None and time.monotonic() > deadline:
            log.info("time budget reached after epoch %d", progress.epoch)
            break
    if ctx.rank == 0:
        _plot(progress.history, out / "curves.png")
        if writer is not None:
            writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    best = next((r for r in progress.history if r["epoch"] == progress.best_epoch), {})
    return {"best_epoch": progress.best_epoch, **{k: v for k, v in best.items() if k.startswith("val_")}}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _plot(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_ce", "train cross-entropy"), ("train_reward", "train CIDEr-D reward")):
        if key in history[0]:
            left.plot(epochs, [r[key] for r in history], marker="o", label=label)
    left.set_xlabel("epoch")
    left.legend()
    # each validation set's CIDEr-D and BLEU-4, and the selection score
    keys = sorted({k for r in history for k in r if k.startswith("val_") and k.endswith(("_CIDEr-D", "_BLEU-4"))} - {"val_CIDEr-D"})
    for key in keys + ["val_CIDEr-D"]:
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            right.plot(*zip(*points), marker="o", label="selection (CIDEr-D)" if key == "val_CIDEr-D" else key[4:])
    right.set_xlabel("epoch")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(prog="captioner train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults: training/configs/flickr8k.yaml values)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"overrides must look like --section.key=value: {' '.join(bad)}")
    return load_config(args.config, overrides), args.resume


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg, resume = parse_args(argv)
    result = main(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""Caption metrics from pycocoevalcap's scorers (the coco-caption toolkit): BLEU-1..4, METEOR
(when Java is present), ROUGE-L and CIDEr-D. SPICE is left out: it downloads a parser at run time.

Captions are tokenised with the model's own tokenizer (lowercase, punctuation dropped), as the
toolkit's PTB tokenizer does, without needing Java for it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil

from captioner.vocab import tokenize

log = logging.getLogger(__name__)


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], *, meteor: bool = True) -> dict[str, float]:
    """predictions: image id -> caption; references: image id -> human captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    missing = [i for i in ids if i not in references]
    if missing:
        raise ValueError(f"no references for {len(missing)} images, e.g. {missing[:3]}")
    res = {i: [" ".join(tokenize(predictions[i])) or "<empty>"] for i in ids}
    gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in ids}
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close_meteor(scorer)
    elif meteor:
        log.warning("METEOR skipped: no Java runtime on PATH")
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _close_meteor(scorer) -> None:
    with contextlib.suppress(Exception):
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()


def diversity(predictions: dict[str, str]) -> dict[str, float]:
    """How varied the captions are: share of the most repeated caption, distinct captions."""
    captions = list(predictions.values())
    if not captions:
        return {"top_caption_share": 0.0, "distinct_captions": 0.0}
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return {"top_caption_share": max(counts.values()) / len(captions), "distinct_captions": len(counts) / len(captions)}

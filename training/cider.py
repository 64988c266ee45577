"""CIDEr-D as a training reward (self-critical training).

The same formula as pycocoevalcap's `Cider` (TF-IDF n-gram vectors for n = 1..4, clipped
similarity, Gaussian length penalty with sigma 6, times 10), but the document frequencies come
from a fixed corpus (the training references) computed once, and the references' vectors are
cached, so scoring thousands of sampled captions per step costs milliseconds. With the evaluated
set's own references as the corpus it equals pycocoevalcap's score (tested).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

Words = Sequence[str]


def _ngrams(words: Words, n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i: i + k])] += 1
    return counts


class CiderD:
    """references: per image, its tokenised human captions. Images are addressed by index."""

    def __init__(self, references: Sequence[Sequence[Words]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        counts = [[_ngrams(ref, n) for ref in refs] for refs in references]
        self.document_frequency: Counter = Counter()
        for refs in counts:
            self.document_frequency.update({gram for ref in refs for gram in ref})
        self.log_documents = math.log(float(len(references)))
        self._references = [[self._vector(ref, len(words)) for ref, words in zip(refs, texts)]
                            for refs, texts in zip(counts, references)]

    def _vector(self, counts: Counter, words: int):
        """-> (per-n {ngram: tf-idf}, per-n norms, length). The length is the bigram count,
        as in coco-caption."""
        vectors: list[dict] = [{} for _ in range(self.n)]
        norms = [0.0] * self.n
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = tf * (self.log_documents - math.log(max(1.0, self.document_frequency[gram])))
            vectors[k][gram] = value
            norms[k] += value * value
        return vectors, [math.sqrt(x) for x in norms], max(words - 1, 0)

    def score(self, image: int, words: Words) -> float:
        """CIDEr-D of one candidate caption against image `image`'s references."""
        vectors, norms, length = self._vector(_ngrams(words, self.n), len(words))
        refs = self._references[image]
        total = 0.0
        for ref_vectors, ref_norms, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if not norms[k] or not ref_norms[k]:
                    continue
                ref = ref_vectors[k]
                overlap = sum(min(v, ref[g]) * ref[g] for g, v in vectors[k].items() if g in ref)
                total += penalty * overlap / (norms[k] * ref_norms[k])
        return 10.0 * total / (self.n * len(refs))

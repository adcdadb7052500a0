"""The filters of ``zyke-train prepare``: quality heuristics by profile, language id, MinHash near-duplicates.

Each filter is a pure decision on one document (or, for ``Deduper``, on one document against those kept so far);
the pipeline in ``prepare.py`` decides the order and counts every document in exactly one bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PrepareError

SHINGLE = 5
MINHASH_SEED = 1  # fixed: signatures saved by an interrupted run must match the ones a resumed run makes
#: datasketch >= 2.0 permutation scheme, named explicitly for the same reason (its default may change).
MINHASH_SCHEME = "affine32"
LSH_RECALL = 0.95


# -- quality profiles


@dataclass(frozen=True)
class Profile:
    """Quality thresholds for one kind of text. ``lang_skip_chars``: below it no language check (too short
    to tell); ``lang_strict_chars``: from it the target language must be the top guess."""

    name: str
    min_words: int
    max_words: int
    min_alnum_ratio: float
    max_repeated_line_ratio: float
    min_mean_word_len: float
    max_mean_word_len: float
    lang_skip_chars: int = 20
    lang_strict_chars: int = 100


PROFILES: dict[str, Profile] = {
    # Gopher (Rae et al. 2021) rules for web pages: 50..100k words, mean word length 3..10, <= 30 %
    # duplicate lines; alphanumeric share 0.8 stands in for its symbol/word and 80 %-alphabetic rules.
    "web": Profile("web", 50, 100_000, 0.80, 0.30, 3.0, 10.0),
    # Books are split into paragraphs, and a novel has one-line paragraphs ("Yes," said he.), so only
    # empty ones go; a paragraph cannot be 100k words, the cap catches a file with no blank lines.
    "books": Profile("books", 1, 20_000, 0.75, 0.30, 2.5, 12.0),
    # NPC and chat lines: "Aye." is a fine reply. Emotes and ellipses lower the alnum share.
    "dialogue": Profile("dialogue", 1, 2_000, 0.60, 0.50, 2.0, 12.0, lang_skip_chars=20, lang_strict_chars=60),
}

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_NOT_ALNUM = re.compile(r"[\W_]+")  # what is left is letters and digits (Unicode), as str.isalnum counts them


def quality_reject(text: str, profile: Profile) -> str | None:
    """The first quality rule ``text`` breaks (the manifest's ``dropped_quality:<rule>``), or None."""
    words = text.split()
    if len(words) < profile.min_words:
        return "too_short"
    if len(words) > profile.max_words:
        return "too_long"
    visible = len(_SPACE.sub("", text))
    if len(_NOT_ALNUM.sub("", text)) < profile.min_alnum_ratio * visible:
        return "alnum_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and (len(lines) - len(set(lines))) > profile.max_repeated_line_ratio * len(lines):
        return "repeated_lines"
    mean = sum(len(w) for w in words) / len(words)
    if not profile.min_mean_word_len <= mean <= profile.max_mean_word_len:
        return "mean_word_len"
    return None


# -- language


class LanguageFilter:
    """Keeps texts in one language (py3langid; its model is an npz inside the wheel, loaded in ~1.5 s)."""

    def __init__(self, lang: str) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.lang = lang
        self._id = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if lang not in self._id.labels:
            raise PrepareError(f"--lang {lang!r} is not a language py3langid knows (ISO 639-1 codes like en, fr)")

    def keep(self, text: str, profile: Profile) -> bool:
        """Long texts: the target must be the top guess. Short ones (py3langid calls "I am fine." Nigerian
        Pidgin): also kept when the top guess is unsure (< 0.5) and the target is among the top 3."""
        n = len(text)
        if n < profile.lang_skip_chars:
            return True
        ranked = self._id.rank(text)
        if ranked[0][0] == self.lang:
            return True
        if n >= profile.lang_strict_chars or ranked[0][1] >= 0.5:
            return False
        return self.lang in (code for code, _ in ranked[:3])


# -- near-duplicates


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows) with the most rows per band (fewest false candidates) that still make a pair at exactly
    ``threshold`` a candidate with probability >= ``recall``: P = 1 - (1 - s^r)^b.

    datasketch's own choice for 0.8/128 perms is 9 x 13, which finds such a pair only 40 % of the time;
    this picks 18 x 7 (98.5 %). Candidates are then confirmed with the Jaccard estimate, so the extra
    candidates cost time, not precision."""
    if not 0 < threshold < 1:
        raise PrepareError(f"--minhash-threshold must be in (0, 1), got {threshold}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def shingles(text: str, n: int = SHINGLE) -> set[bytes]:
    """Word n-grams of the lowercased text (punctuation dropped); a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Deduper:
    """MinHash LSH index of the kept documents: ``is_dup`` then ``add``."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold = threshold
        self.num_perm = num_perm
        self.params = lsh_params(threshold, num_perm)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=self.params)
        # Drawing the permutations costs more than hashing a paragraph: draw them once, share them.
        self._perms = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations
        self._sigs: dict[str, Any] = {}

    def signature(self, text: str) -> Any:
        m = self._minhash(num_perm=self.num_perm, seed=MINHASH_SEED, permutations=self._perms, scheme=MINHASH_SCHEME)
        m.update_batch(list(shingles(text)))
        return m

    def is_dup(self, sig: Any) -> bool:
        return any(sig.jaccard(self._sigs[key]) >= self.threshold for key in self._lsh.query(sig))

    def add(self, key: str, sig: Any) -> None:
        self._lsh.insert(key, sig)
        self._sigs[key] = sig

    def add_saved(self, prefix: str, hashvalues: np.ndarray) -> None:
        """Re-insert signatures an earlier run saved (resume)."""
        for i, row in enumerate(hashvalues):
            self.add(f"{prefix}/{i}", self._minhash(num_perm=self.num_perm, seed=MINHASH_SEED, hashvalues=row,
                                                      permutations=self._perms, scheme=MINHASH_SCHEME))

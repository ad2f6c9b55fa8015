"""A small synthetic translation corpus for the quickstart: deterministic, learnable in minutes.

The "source" language is SVO with adjectives before the noun and plural marked on nouns and verbs.
The "target" language is word-by-word translatable but needs

* reordering: subject-object-verb order within each clause, adjectives after their noun;
* agreement: every target noun has a lexical gender (not visible in the source), which selects the
  form of its determiner and adjectives; the clause-final verb agrees in number with the subject,
  which can be many tokens back (after the object and a prepositional phrase).

Sentences have 1-3 clauses joined by a conjunction and 3..25 tokens, so batches need padding.
Everything derives from ``random.Random(seed)``: the same seed gives the same corpus.

Words are made-up syllable strings (:func:`make_lexicon`); with seed 1 a pair reads::

    src: ko melo giposu kepetes gutumo ki pavo puzovis se ko buka zudas ki bukas se ...
    tgt: la mufi mesea lu dodan losipoo ketuza vilita to le vusuzu lu vusuzun mifita ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines

MIN_LEN, MAX_LEN = 3, 25
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class Lexicon:
    """Source/target word pairs per class; ``gender[i]`` is target noun i's gender (0/1)."""

    nouns: list[tuple[str, str]]
    gender: list[int]
    adjectives: list[tuple[str, str]]
    verbs: list[tuple[str, str]]
    preps: list[tuple[str, str]]


def _word(rng: random.Random, used: set[str], n_syll: int) -> str:
    while True:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(n_syll))
        if w not in used:
            used.add(w)
            return w


def make_lexicon(rng: random.Random, n_nouns=40, n_adj=16, n_verbs=16, n_preps=6) -> Lexicon:
    """Random made-up words (2-3 syllables); source and target words never coincide."""
    used: set[str] = {"ko", "ki", "lu", "la", "le", "se", "ta", "to", "na", "ne"}

    def pairs(n):
        return [(_word(rng, used, rng.choice((2, 3))), _word(rng, used, rng.choice((2, 3))))
                for _ in range(n)]

    return Lexicon(pairs(n_nouns), [rng.randrange(2) for _ in range(n_nouns)], pairs(n_adj),
                   pairs(n_verbs), pairs(n_preps))


def _noun_phrase(rng: random.Random, lex: Lexicon) -> tuple[list[str], list[str], int]:
    """(source tokens, target tokens, number) of one noun phrase."""
    i = rng.randrange(len(lex.nouns))
    plural = rng.random() < 0.4
    adjs = rng.sample(range(len(lex.adjectives)), rng.choice((0, 0, 1, 1, 2)))
    src_noun, tgt_noun = lex.nouns[i]
    # source: determiner + adjectives + noun, plural suffix "s"
    src = ["ko" if not plural else "ki"] + [lex.adjectives[a][0] for a in adjs]
    src.append(src_noun + ("s" if plural else ""))
    # target: gender/number-marked determiner, noun (plural "n"), adjectives agreeing in gender
    g = lex.gender[i]
    det = ("la", "le")[g] if not plural else ("lu", "lu")[g]
    tgt = [det, tgt_noun + ("n" if plural else "")]
    tgt += [lex.adjectives[a][1] + ("a" if g == 0 else "o") for a in adjs]
    return src, tgt, int(plural)


def _clause(rng: random.Random, lex: Lexicon) -> tuple[list[str], list[str]]:
    subj_s, subj_t, plural = _noun_phrase(rng, lex)
    v = rng.randrange(len(lex.verbs))
    src, tgt = list(subj_s), list(subj_t)
    src.append(lex.verbs[v][0] + ("" if plural else "s"))
    middle_t = []
    if rng.random() < 0.7:
        obj_s, obj_t, _ = _noun_phrase(rng, lex)
        src += obj_s
        middle_t += obj_t
    if rng.random() < 0.4:
        p = rng.randrange(len(lex.preps))
        pp_s, pp_t, _ = _noun_phrase(rng, lex)
        src += [lex.preps[p][0]] + pp_s
        middle_t += pp_t + [lex.preps[p][1]]  # postpositions in the target
    tgt += middle_t + [lex.verbs[v][1] + ("ne" if plural else "ta")]
    return src, tgt


def sentence_pair(rng: random.Random, lex: Lexicon) -> tuple[str, str]:
    """One pair of 3..25 tokens after tokenization (resampled until it fits)."""
    while True:
        src, tgt = [], []
        for k in range(rng.choice((1, 1, 2, 2, 3))):
            s, t = _clause(rng, lex)
            if k:
                src.append("se")
                tgt.append("to")
            src += s
            tgt += t
        src.append(".")
        tgt.append(".")
        if MIN_LEN <= len(src) <= MAX_LEN and MIN_LEN <= len(tgt) <= MAX_LEN:
            # raw text as people write it (full stop attached); the Moses tokenizer splits it off
            return " ".join(src[:-1]) + ".", " ".join(tgt[:-1]) + "."


def generate(out_dir: str | Path, *, seed: int = 1, n_train: int = 8000, n_valid: int = 300,
             n_test: int = 300) -> dict:
    """Write ``{train,valid,test}.{src,tgt}`` under ``out_dir``; returns the split sizes.

    The lexicon and all sentences come from one ``random.Random(seed)``; test pairs are disjoint
    from training pairs so BLEU measures generalization, not memorization.
    """
    rng = random.Random(seed)
    lex = make_lexicon(rng)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    seen: set[tuple[str, str]] = set()
    for split in ("test", "valid", "train"):
        pairs = []
        while len(pairs) < sizes[split]:
            pair = sentence_pair(rng, lex)
            if pair in seen:
                continue
            seen.add(pair)
            pairs.append(pair)
        atomic_write_lines(Path(out_dir) / f"{split}.src", (p[0] for p in pairs))
        atomic_write_lines(Path(out_dir) / f"{split}.tgt", (p[1] for p in pairs))
    return sizes

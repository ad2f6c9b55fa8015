"""powernorm_fairseq.analysis.stats: paired intervals over seeds, verdicts, paired bootstrap."""

import math
import random

import pytest

from powernorm_fairseq.analysis.stats import (
    mean_sd,
    paired_bootstrap_bleu,
    paired_interval,
    verdict,
)


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    iv = paired_interval({1: 21.0, 2: 22.2, 3: 23.1}, {1: 20.0, 2: 21.0, 3: 22.0})
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert iv.n == 3 and iv.mean == pytest.approx(1.1)
    assert (iv.low, iv.high) == pytest.approx((1.1 - half, 1.1 + half))
    assert iv.excludes_zero
    assert verdict("PN", "LN", iv, higher_better=True) == "PN > LN (better)"
    assert verdict("PN", "LN", iv, higher_better=False) == "PN > LN (worse)"  # e.g. perplexity


def test_pairing_uses_only_shared_seeds_and_noise_is_no_difference():
    iv = paired_interval({1: 19.0, 2: 22.0, 3: 22.0, 4: 99.0}, {1: 20.0, 2: 21.0, 3: 22.0})
    assert iv.n == 3 and iv.mean == pytest.approx(0.0)
    assert not iv.excludes_zero
    assert verdict("BN", "LN", iv, True) == "no significant difference at this scale"
    one = paired_interval({1: 2.0}, {1: 1.0})
    assert one.n == 1 and not one.excludes_zero and "1 seed" in one.fmt()
    assert verdict("BN", "LN", one, True) == "untested"  # one seed is not "no difference"
    assert paired_interval({1: 1.0}, {2: 1.0}) is None
    assert verdict("BN", "LN", None, True) == "not run"
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_paired_bootstrap_separates_a_clearly_better_system():
    rng = random.Random(0)
    refs = [" ".join(rng.choice("abcdefghij") for _ in range(8)) for _ in range(200)]
    good = [r if rng.random() < 0.9 else "x y z" for r in refs]
    bad = [r if rng.random() < 0.5 else "x y z" for r in refs]
    res = paired_bootstrap_bleu(refs, bad, good, tokenize="none", n_samples=200)
    assert res["p_value"] < 0.05 and res["system"]["score"] > res["baseline"]["score"]
    assert "bs:200" in res["signature"]
    # sacreBLEU tests the absolute difference: a clearly worse system is significant too, and the
    # direction is read from the scores
    worse = paired_bootstrap_bleu(refs, good, bad, tokenize="none", n_samples=200)
    assert worse["p_value"] < 0.05 and worse["system"]["score"] < worse["baseline"]["score"]
    near = [r if rng.random() < 0.9 else "x y z" for r in refs]
    assert paired_bootstrap_bleu(refs, good, near, tokenize="none", n_samples=200)["p_value"] > 0.05
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap_bleu(refs, good[:-1], good)

"""evaluate: the paper's BLEU flavours and 'nothing silently lost' checks (no model needed)."""

import json

import pytest

from powernorm_fairseq.pipeline import evaluate


def test_compound_split_matches_the_paper_rule():
    assert evaluate.compound_split("a well-known e-mail - x") == \
        "a well ##AT##-##AT## known e ##AT##-##AT## mail - x"
    # non-overlapping, as Perl's s///g
    assert evaluate.compound_split("a-b-c") == "a ##AT##-##AT## b-c"


def test_bleu_flavours():
    refs_raw = ["Ein Hund läuft im Park.", "Zwei Männer spielen Fußball."]
    refs_tok = ["ein hund läuft im park .", "zwei männer spielen fußball ."]
    s = evaluate.score_bleu(refs_tok, refs_tok, refs_raw, lang="de", case_sensitive=False,
                            compound=False)
    assert s["bleu_tokenized"]["score"] == 100.0
    assert s["bleu_detok"]["score"] == 100.0  # detokenized and compared case-insensitively
    assert "case:lc" in s["bleu_detok"]["signature"] and "tok:13a" in s["bleu_detok"]["signature"]
    assert "tok:none" in s["bleu_tokenized"]["signature"]
    assert s["hyps_detok"][0] == "ein hund läuft im park."
    cs = evaluate.score_bleu(["Ein Hund @-@ Park ."], None, ["Ein Hund-Park."], lang="de",
                             case_sensitive=True, compound=True)
    assert cs["bleu_tokenized"]["score"] == 100.0 and "case:mixed" in cs["bleu_tokenized"]["signature"]


def fake_prepared(tmp_path, n_test=3):
    root = tmp_path / "data"
    (root / "data-bin").mkdir(parents=True)
    (root / "ref").mkdir()
    refs = [f"satz nummer {i} ." for i in range(n_test)]
    (root / "ref" / "test.tgt.tok").write_text("".join(r + "\n" for r in refs))
    (root / "ref" / "test.tgt.detok").write_text("".join(r.replace(" .", ".") + "\n" for r in refs))
    rec = {"corpus": "synthetic", "kind": "translation", "src": "src", "tgt": "tgt",
           "sizes": {"test": n_test}, "bpe": {"method": "subword-nmt"},
           "data_bin": str(root / "data-bin"),
           "references": {"tok": str(root / "ref" / "test.tgt.tok"),
                          "detok": str(root / "ref" / "test.tgt.detok")}}
    (root / "prepare.json").write_text(json.dumps(rec))
    for name in ("dict.src.txt", "test.src-tgt.src.idx", "test.src-tgt.src.bin"):
        (root / "data-bin" / name).write_text("x")
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    return root, ckpt, refs


def test_bleu_fails_if_a_sentence_is_missing(tmp_path, monkeypatch):
    root, ckpt, refs = fake_prepared(tmp_path)
    out = "\n".join(f"H-{i}\t-0.1\t{r}" for i, r in enumerate(refs) if i != 1)
    monkeypatch.setattr(evaluate, "run_cmd", lambda cmd: out)
    with pytest.raises(SystemExit, match="translated 2 of 3.*missing ids.*1"):
        evaluate.main(["bleu", "--data", str(root), "--checkpoint", str(ckpt)])


def test_bleu_record(tmp_path, monkeypatch):
    root, ckpt, refs = fake_prepared(tmp_path)
    out = "\n".join(f"H-{i}\t-0.1\t{r}" for i, r in reversed(list(enumerate(refs))))
    captured = {}
    monkeypatch.setattr(evaluate, "run_cmd", lambda cmd: captured.setdefault("cmd", cmd) and out)
    rec = evaluate.main(["bleu", "--data", str(root / "data-bin"), "--checkpoint", str(ckpt),
                         "--out", str(tmp_path / "r.json")])
    assert rec["value"] == 100.0 and rec["n_sentences_scored"] == rec["n_test_sentences"] == 3
    assert rec["beam"] == 5 and rec["lenpen"] == 1.0
    for key in ("checkpoint", "data", "command", "git_commit", "hardware", "wall_s"):
        assert key in rec
    # the one hardware description every record shares: which CPU, and how many threads
    assert rec["hardware"]["cpu"] and "threads" in rec["hardware"] and "gpu" in rec["hardware"]
    assert json.loads((tmp_path / "r.json").read_text())["value"] == 100.0
    assert "--post-process" in captured["cmd"] and "subword_nmt" in captured["cmd"]


def test_half_written_data_is_a_clear_error(tmp_path):
    root, ckpt, _ = fake_prepared(tmp_path)
    (root / "data-bin" / "test.src-tgt.src.bin").unlink()
    with pytest.raises(SystemExit, match="missing or empty.*rerun prepare"):
        evaluate.main(["bleu", "--data", str(root), "--checkpoint", str(ckpt)])


def test_missing_prepare_record_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="no prepare.json"):
        evaluate.main(["bleu", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "ckpt.pt")])


def test_ppl_fails_if_tokens_were_skipped(tmp_path, monkeypatch):
    root, ckpt, _ = fake_prepared(tmp_path)
    rec = json.loads((root / "prepare.json").read_text())
    rec["kind"] = "lm"
    (root / "prepare.json").write_text(json.dumps(rec))
    monkeypatch.setattr(evaluate, "test_set_tokens", lambda d: 1000)
    monkeypatch.setattr(evaluate, "run_cmd", lambda cmd: (
        "Evaluated 990 tokens in 1.0s (990.00 tokens/s)\nLoss (base 2): 5.0000, Perplexity: 32.00"))
    with pytest.raises(SystemExit, match="scored 990 tokens, the test set has 1000"):
        evaluate.main(["ppl", "--data", str(root), "--checkpoint", str(ckpt), "--tokens-per-sample", "64"])
    monkeypatch.setattr(evaluate, "test_set_tokens", lambda d: 990)
    out = evaluate.main(["ppl", "--data", str(root), "--checkpoint", str(ckpt), "--tokens-per-sample", "64"])
    assert out["value"] == 32.0 and out["n_tokens_scored"] == 990


def test_ppl_block_length_defaults_to_the_trained_one(tmp_path):
    """fairseq-eval-lm skips every block longer than the model's positions: by default the
    evaluation uses the checkpoint's own tokens_per_sample."""
    import torch

    ckpt = tmp_path / "lm.pt"
    torch.save({"cfg": {"task": {"tokens_per_sample": 64}}, "model": {}}, ckpt)
    assert evaluate.trained_tokens_per_sample(ckpt) == 64
    torch.save({"cfg": {"task": {}}, "args": None, "model": {}}, ckpt)
    with pytest.raises(SystemExit, match="pass --tokens-per-sample"):
        evaluate.trained_tokens_per_sample(ckpt)

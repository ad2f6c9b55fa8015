"""prepare: synthetic corpus, checks between steps, idempotence, and clear failures (issue #8)."""

import json
import urllib.request
from pathlib import Path

import pytest

from powernorm_fairseq import synthetic
from powernorm_fairseq.pipeline import prepare
from powernorm_fairseq.pipeline.prepare import iwslt14, ptb, steps
from powernorm_fairseq.pipeline.train import check_data_dir


def write_corpus(d: Path, pairs_per_split: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, (src, tgt) in pairs_per_split.items():
        (d / f"{split}.src").write_text("".join(s + "\n" for s in src))
        (d / f"{split}.tgt").write_text("".join(t + "\n" for t in tgt))
    return d


def small_corpus(tmp_path, n=40):
    synthetic.generate(tmp_path / "gen", seed=3, n_train=n, n_valid=8, n_test=8)
    read = lambda f: (tmp_path / "gen" / f).read_text().splitlines()  # noqa: E731
    return {s: (read(f"{s}.src"), read(f"{s}.tgt")) for s in ("train", "valid", "test")}


def run_prepare(*argv):
    return prepare.prepare(prepare.build_parser().parse_args(list(argv)))


def test_synthetic_is_deterministic_and_varies_length(tmp_path):
    synthetic.generate(tmp_path / "a", seed=5, n_train=300, n_valid=20, n_test=20)
    synthetic.generate(tmp_path / "b", seed=5, n_train=300, n_valid=20, n_test=20)
    synthetic.generate(tmp_path / "c", seed=6, n_train=300, n_valid=20, n_test=20)
    for f in ("train.src", "train.tgt", "test.tgt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "train.src").read_bytes() != (tmp_path / "c" / "train.src").read_bytes()
    lengths = [len(line.split()) + 1 for line in (tmp_path / "a" / "train.src").read_text().splitlines()]
    assert min(lengths) >= synthetic.MIN_LEN and max(lengths) <= synthetic.MAX_LEN
    assert max(lengths) - min(lengths) >= 10  # padding matters
    train = set((tmp_path / "a" / "train.src").read_text().splitlines())
    assert not train & set((tmp_path / "a" / "test.src").read_text().splitlines())


def test_line_count_mismatch_fails(tmp_path):
    pairs = small_corpus(tmp_path)
    src, tgt = pairs["train"]
    pairs["train"] = (src, tgt[:-1])
    d = write_corpus(tmp_path / "bad", pairs)
    with pytest.raises(SystemExit, match="different line counts"):
        run_prepare("synthetic", "--from", str(d), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out" / ".done" / "fetch").exists()


def test_missing_source_files_say_what_to_pass(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--from .*empty"):
        run_prepare("multi30k", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))


def test_checksum_mismatch_fails_unless_no_verify(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    for stem in ("train", "val", "test_2016_flickr"):
        for lang in ("de", "en"):
            (d / f"{stem}.{lang}").write_text("ein hund .\n")
    with pytest.raises(SystemExit, match="checksum mismatch"):
        run_prepare("multi30k", "--from", str(d), "--out", str(tmp_path / "out"))
    # --no-verify accepts the user's own copy: no checksums and no pinned sizes (issue 18.17)
    record = run_prepare("multi30k", "--from", str(d), "--out", str(tmp_path / "out2"),
                         "--no-verify", "--bpe-size", "20", "--workers", "1")
    assert record["sizes"] == {"train": 1, "valid": 1, "test": 1}


def test_unpinned_checksum_fails_with_the_computed_value(tmp_path):
    archive = tmp_path / "de-en.tgz"
    archive.write_bytes(b"x")
    with pytest.raises(SystemExit, match="(?s)no pinned sha256 checksum.*--no-verify"):
        run_prepare("iwslt14", "--from", str(tmp_path), "--out", str(tmp_path / "out"))


def test_failed_download_names_url_and_from(tmp_path, monkeypatch):
    def fail(url, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", fail)
    with pytest.raises(SystemExit) as e:
        run_prepare("ptb", "--out", str(tmp_path / "out"))
    msg = str(e.value)
    assert ptb.PTB_URL.format("train") in msg and "--from DIR" in msg


def test_clean_drops_pairs_with_an_empty_side_on_both_sides(tmp_path):
    corpus = prepare.CORPORA["synthetic"]
    raw, out = tmp_path / "raw", tmp_path / "clean"
    write_corpus(raw, {s: (["a b", "", "c d", "e"], ["x", "y", "  ", "z"]) for s in prepare.SPLITS})
    dropped = steps.step_clean(corpus, raw, out)
    assert dropped == {"train": 2, "valid": 2, "test": 2}
    assert (out / "train.src").read_text() == "a b\ne\n"
    assert (out / "train.tgt").read_text() == "x\nz\n"


@pytest.mark.slow
def test_prepare_end_to_end_idempotent_and_redoes_a_broken_step(tmp_path):
    pairs = small_corpus(tmp_path)
    src, tgt = pairs["train"]
    pairs["train"] = (src + ["ein satz ohne partner ."], tgt + [""])
    d = write_corpus(tmp_path / "corpus", pairs)
    out = tmp_path / "out"
    rec = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50",
                      "--workers", "1")
    assert rec["dropped_empty"]["train"] == 1
    assert rec["sizes"] == {"train": 40, "valid": 8, "test": 8}
    assert rec["binarized"]["train.src"]["sentences"] == 40
    assert (out / "data-bin" / "dict.src.txt").exists()
    assert (out / "ref" / "test.tgt.detok").read_text().splitlines() == pairs["test"][1]
    saved = json.loads((out / "prepare.json").read_text())
    assert saved["steps_run"] == ["fetch", "clean", "tokenize", "references", "bpe", "binarize"]
    check_data_dir(out / "data-bin")

    # second run: nothing to do
    again = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50")
    assert again["steps_run"] == [] and len(again["steps_skipped"]) == 6

    # an interrupted binarize (marker gone, temp dir left behind) is redone; the rest is skipped
    (out / ".done" / "binarize").unlink()
    (out / "data-bin.tmp").mkdir()
    with pytest.raises(SystemExit, match="unfinished prepare"):
        check_data_dir(out / "data-bin")
    redo = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50")
    assert redo["steps_run"] == ["binarize"]
    assert not (out / "data-bin.tmp").exists()
    check_data_dir(out / "data-bin")

    # other settings: the BPE step and everything after it are redone
    other = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "60")
    assert other["steps_run"] == ["bpe", "binarize"] and other["bpe"]["size"] == 60


def test_check_data_dir_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist.*prepare"):
        check_data_dir(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(SystemExit, match="no dict"):
        check_data_dir(tmp_path / "d")
    (tmp_path / "d" / "dict.src.txt").write_text("a 1\n")
    (tmp_path / "d" / "train.src-tgt.src.idx").write_bytes(b"x")
    (tmp_path / "d" / "valid.src-tgt.src.idx").write_bytes(b"x")
    (tmp_path / "d" / "valid.src-tgt.src.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match="train.src-tgt.src.bin is missing or empty"):
        check_data_dir(tmp_path / "d")


def test_iwslt14_extraction_from_the_release_layout(tmp_path):
    """The recipe's tag cleanup and test-set assembly on a miniature de-en.tgz."""
    import argparse
    import io
    import tarfile

    train = {"de": "<url>http://x</url>\n<talkid>1</talkid>\n<title>Titel</title>\nHallo Welt .\n",
             "en": "<url>http://x</url>\n<talkid>1</talkid>\n<title>Title</title>\nHello world .\n"}
    archive = tmp_path / "de-en.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for lang in ("de", "en"):
            add(f"train.tags.de-en.{lang}", train[lang])
            for i, stem in enumerate(iwslt14.IWSLT14_TEST):
                add(f"{stem}.de-en.{lang}.xml",
                    f'<doc>\n<seg id="1"> {lang} {i} it\u2019s </seg>\n</doc>\n')
    args = argparse.Namespace(from_dir=str(tmp_path), no_verify=True, download_dir=str(tmp_path))
    raw = tmp_path / "raw"
    iwslt14.fetch_iwslt14(args, raw)
    assert (raw / "train.de").read_text() == "Titel\nHallo Welt .\n"
    assert (raw / "train.en").read_text() == "Title\nHello world .\n"
    assert (raw / "test.en").read_text().splitlines() == [f"en {i} it's" for i in range(5)]


def test_train_filter_and_valid_split(tmp_path):
    corpus = prepare.CORPORA["iwslt14"]
    tok, out = tmp_path / "tok", tmp_path / "filtered"
    src = [f"w{i} x" for i in range(50)] + ["a b c d e f g"]  # the last pair: ratio 7 > 1.5
    tgt = [f"v{i} y" for i in range(50)] + ["z"]
    write = lambda p, lines: p.write_text("".join(x + "\n" for x in lines))  # noqa: E731
    tok.mkdir()
    write(tok / "train.de", src)
    write(tok / "train.en", tgt)
    write(tok / "test.de", ["t"])
    write(tok / "test.en", ["t"])
    info = steps.step_filter_train(corpus, tok, out)
    assert info == {"length_ratio_filtered": 1}
    valid = (out / "valid.de").read_text().splitlines()
    assert valid == ["w22 x", "w45 x"]  # every 23rd kept pair
    assert len((out / "train.en").read_text().splitlines()) == 48


def test_changed_from_contents_redo_every_step(tmp_path):
    """The skip of finished steps is keyed on the --from files' size and mtime, not their path."""
    pairs = small_corpus(tmp_path)
    d = write_corpus(tmp_path / "corpus", pairs)
    out = tmp_path / "out"
    first = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50")
    assert first["sizes"]["train"] == 40
    with open(d / "train.src", "a") as f_src, open(d / "train.tgt", "a") as f_tgt:
        f_src.write("ein neuer satz .\n")
        f_tgt.write("a new sentence .\n")
    again = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50")
    assert again["steps_run"] == ["fetch", "clean", "tokenize", "references", "bpe", "binarize"]
    assert again["sizes"]["train"] == 41
    unchanged = run_prepare("synthetic", "--from", str(d), "--out", str(out), "--bpe-size", "50")
    assert unchanged["steps_run"] == []

"""Evaluate a checkpoint: BLEU (translation) or test perplexity (language modelling).

Usage::

    python -m powernorm_fairseq.pipeline.evaluate bleu --data data/multi30k --checkpoint CKPT
    python -m powernorm_fairseq.pipeline.evaluate ppl --data data/ptb --checkpoint CKPT

BLEU follows the paper per recipe (beam, length penalty, metric) and also reports detokenized
sacreBLEU with its signature:

* ``iwslt14`` / ``multi30k``: beam 5, lenpen 1.0; tokenized case-insensitive BLEU on the
  Moses-tokenized, lowercased text (sacreBLEU ``tokenize='none', lowercase=True``).
* ``wmt14_en_de``: beam 4, lenpen 0.6; tokenized case-sensitive BLEU after Moses detok -> tok and
  compound splitting (``a-b`` -> ``a ##AT##-##AT## b``), as the paper's ``multi-bleu.perl`` setup.
* detokenized sacreBLEU: hypotheses detokenized with sacremoses against the raw references
  (``lowercase=True`` for corpora the recipe lowercases: the model never saw case).

Each run writes a JSON record (atomically) with the scores, the number of sentences / tokens scored
(the run fails if that differs from the test set size: nothing is silently lost), the checkpoint,
data, command, git commit, hardware and wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_write_json,
    atomic_write_lines,
    git_commit,
    hardware,
    invocation,
    log,
    python_module_cmd,
    read_lines,
    run_cmd,
    stage_command,
)
from powernorm_fairseq.pipeline.train import check_data_dir

RECIPES = {
    "iwslt14": {"beam": 5, "lenpen": 1.0, "case_sensitive": False, "compound_split": False},
    "multi30k": {"beam": 5, "lenpen": 1.0, "case_sensitive": False, "compound_split": False},
    "synthetic": {"beam": 5, "lenpen": 1.0, "case_sensitive": False, "compound_split": False},
    "wmt14_en_de": {"beam": 4, "lenpen": 0.6, "case_sensitive": True, "compound_split": True},
}

_HYP = re.compile(r"^H-(\d+)\t\S+\t(.*)$")
_EVAL_LM = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s")
_PPL = re.compile(r"Loss \(base 2\): ([\d.]+|nan|inf), Perplexity: ([\d.]+|nan|inf)")

#: what an evaluation writes by default: its record beside the checkpoint (``<checkpoint>`` +
#: the record's suffix) and the files beside the record (the record's path, suffix replaced)
RECORDS = {"bleu": (".bleu.json", (".hyp.txt", ".hyp.tok.txt")), "ppl": (".ppl.json", ())}


def record_files(checkpoint: str | Path) -> list[Path]:
    """Every file an evaluation of ``checkpoint`` writes at its default paths, each metric's
    record and its translations (what a replaced checkpoint must not leave behind)."""
    out = []
    for record, beside in RECORDS.values():
        path = Path(checkpoint).with_suffix(record)
        out += [path, *(path.with_suffix(s) for s in beside)]
    return out


def load_prepared(data: str | Path) -> tuple[Path, dict]:
    """(prepared root, prepare.json record) for a prepared root or its ``data-bin``."""
    data = Path(data).resolve()
    for root in (data, data.parent):
        if (root / "prepare.json").exists():
            return root, json.loads((root / "prepare.json").read_text())
    raise SystemExit(f"{data} has no prepare.json (nor has its parent): pass the directory written "
                     "by scripts/prepare_<corpus>.sh, or finish that run (rerun the same command).")


def _device_flags() -> list[str]:
    import torch

    return [] if torch.cuda.is_available() else ["--cpu"]


def compound_split(line: str) -> str:
    r"""The paper's WMT14 compound splitting: ``a-b`` -> ``a ##AT##-##AT## b``.

    Same regex and non-overlapping semantics as the Perl one-liner of fairseq's/the paper's
    scripts (``s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g``), so ``a-b-c`` -> ``a ##AT##-##AT## b-c``.
    """
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def score_bleu(hyps_tok: list[str], refs_tok: list[str], refs_raw: list[str], *, lang: str,
               case_sensitive: bool, compound: bool) -> dict:
    """Tokenized BLEU (the paper's metric) and detokenized sacreBLEU for tokenized hypotheses."""
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer, MosesTokenizer

    detok = MosesDetokenizer(lang=lang)
    # " @-@ " is the Moses aggressive-dash marker of the WMT14 training text.
    hyps_detok = [detok.detokenize(h.replace(" @-@ ", "-").split()) for h in hyps_tok]
    if compound:
        tok = MosesTokenizer(lang=lang)
        hyps_paper = [compound_split(tok.tokenize(h, escape=False, return_str=True)) for h in hyps_detok]
        refs_paper = [compound_split(tok.tokenize(r, escape=False, return_str=True)) for r in refs_raw]
    else:
        hyps_paper, refs_paper = hyps_tok, refs_tok
    lower = not case_sensitive
    tokenized = BLEU(tokenize="none", lowercase=lower, force=True)
    detokenized = BLEU(lowercase=lower)
    t = tokenized.corpus_score(hyps_paper, [refs_paper])
    d = detokenized.corpus_score(hyps_detok, [refs_raw])
    return {
        "bleu_tokenized": {"score": round(t.score, 2), "signature": str(tokenized.get_signature()),
                           "detail": str(t)},
        "bleu_detok": {"score": round(d.score, 2), "signature": str(detokenized.get_signature()),
                       "detail": str(d)},
        "hyps_detok": hyps_detok,
        "hyps_paper": hyps_paper,
    }


def evaluate_bleu(args) -> dict:
    root, prep = load_prepared(args.data)
    check_data_dir(prep["data_bin"], splits=("test",))
    if prep["kind"] != "translation":
        raise SystemExit(f"{root} holds a {prep['kind']} corpus; use `evaluate ppl`")
    recipe = RECIPES[args.recipe or prep["corpus"]] if (args.recipe or prep["corpus"]) in RECIPES else None
    if recipe is None:
        raise SystemExit(f"no BLEU recipe for {prep['corpus']}; pass --recipe {sorted(RECIPES)}")
    beam = args.beam or recipe["beam"]
    lenpen = args.lenpen if args.lenpen is not None else recipe["lenpen"]
    refs_tok = read_lines(prep["references"]["tok"])
    refs_raw = read_lines(prep["references"]["detok"])
    n_test = prep["sizes"]["test"]
    if len(refs_tok) != n_test or len(refs_raw) != n_test:
        raise SystemExit(f"references in {root / 'ref'} have {len(refs_tok)}/{len(refs_raw)} lines, "
                         f"the test set {n_test}: rerun prepare")
    post = "sentencepiece" if (prep.get("bpe") or {}).get("method") == "sentencepiece" else "subword_nmt"
    cmd = python_module_cmd("fairseq_cli.generate") + [
        prep["data_bin"], "--path", str(args.checkpoint), "--user-dir", str(PLUGIN_DIR),
        "--gen-subset", "test", "--source-lang", prep["src"], "--target-lang", prep["tgt"],
        "--beam", str(beam), "--lenpen", str(lenpen), "--batch-size", str(args.batch_size),
        "--post-process", post, "--num-workers", "0", "--max-len-a", str(args.max_len_a),
        "--max-len-b", str(args.max_len_b), *_device_flags()]
    t0 = time.time()
    log(f"generating: beam {beam}, lenpen {lenpen}, {n_test} test sentences")
    output = run_cmd(cmd)
    hyps = {}
    for line in output.splitlines():
        m = _HYP.match(line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    if sorted(hyps) != list(range(n_test)):
        missing = sorted(set(range(n_test)) - set(hyps))[:10]
        raise SystemExit(f"fairseq-generate translated {len(hyps)} of {n_test} test sentences "
                         f"(missing ids, first 10: {missing}); nothing is scored on a partial set.")
    hyps_tok = [hyps[i] for i in range(n_test)]
    scores = score_bleu(hyps_tok, refs_tok, refs_raw, lang=prep["tgt"],
                        case_sensitive=recipe["case_sensitive"], compound=recipe["compound_split"])
    record_suffix, (detok_suffix, tok_suffix) = RECORDS["bleu"]
    out = Path(args.out or Path(args.checkpoint).with_suffix(record_suffix))
    atomic_write_lines(out.with_suffix(detok_suffix), scores.pop("hyps_detok"))
    # the hypotheses as the paper's metric scores them (paired bootstrap of the tokenized BLEU)
    atomic_write_lines(out.with_suffix(tok_suffix), scores.pop("hyps_paper"))
    record = {
        "metric": "bleu", "value": scores["bleu_tokenized"]["score"],
        "metric_definition": ("tokenized BLEU, " + ("case-sensitive, compound-split"
                                                    if recipe["case_sensitive"] else "case-insensitive")),
        **scores, "beam": beam, "lenpen": lenpen, "recipe": args.recipe or prep["corpus"],
        "checkpoint": str(Path(args.checkpoint).resolve()), "data": str(root),
        "n_sentences_scored": len(hyps_tok), "n_test_sentences": n_test,
        "hypotheses": str(out.with_suffix(detok_suffix)),
        "hypotheses_tokenized": str(out.with_suffix(tok_suffix)), "command": args.command,
        "fairseq_command": " ".join(cmd), "git_commit": git_commit(), "hardware": hardware(),
        "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(out, record)
    log(f"BLEU tokenized {record['bleu_tokenized']['score']} | detok sacreBLEU "
        f"{record['bleu_detok']['score']} ({len(hyps_tok)} sentences) -> {out}")
    return record


def test_set_tokens(data_bin: str | Path) -> int:
    """Number of tokens (words + one <eos> per line) of the binarized LM test set."""
    from fairseq.data import Dictionary, data_utils

    data_bin = Path(data_bin)
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(data_bin / "test"), dictionary)
    if ds is None:
        raise SystemExit(f"{data_bin} has no binarized test split")
    return int(ds.sizes.sum())


def _trained_task(checkpoint: str | Path) -> dict:
    """``{"task", "arch", "tokens_per_sample"}`` from a fairseq checkpoint's stored config (None
    where absent). The config is trusted: fairseq checkpoints hold config objects, hence
    ``weights_only=False``."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state.get("cfg") or {}
    legacy = state.get("args")  # checkpoints of older fairseq: one argparse Namespace

    def get(section: str, key: str, legacy_key: str):
        sub = cfg.get(section) if hasattr(cfg, "get") else None
        value = sub.get(key) if hasattr(sub, "get") else None  # dict or DictConfig
        return value if value is not None or legacy is None else getattr(legacy, legacy_key, None)

    return {"task": get("task", "_name", "task"), "arch": get("model", "_name", "arch"),
            "tokens_per_sample": get("task", "tokens_per_sample", "tokens_per_sample")}


def check_trained_for(checkpoint: str | Path, metric: str) -> None:
    """Fail clearly when ``checkpoint`` is not a model of the kind ``metric`` evaluates."""
    try:
        trained = _trained_task(checkpoint)
    except Exception:  # unreadable: fairseq's load reports it (compat.CheckpointError names it)
        return
    task = str(trained["task"] or "")
    if metric == "ppl" and task.startswith("translation"):
        raise SystemExit(f"{checkpoint} is a translation model (task {task}, arch "
                         f"{trained['arch']}); evaluate it with "
                         f"{stage_command('scripts/evaluate_bleu.sh', 'powernorm-evaluate bleu')}, not the "
                         "perplexity (for language models).")
    if metric == "bleu" and task == "language_modeling":
        raise SystemExit(f"{checkpoint} is a language model (arch {trained['arch']}); evaluate "
                         f"it with {stage_command('scripts/evaluate_ppl.sh', 'powernorm-evaluate ppl')}, "
                         "not BLEU.")


def trained_tokens_per_sample(checkpoint: str | Path) -> int:
    """The task's ``tokens_per_sample`` stored in a fairseq LM checkpoint."""
    value = _trained_task(checkpoint)["tokens_per_sample"]
    if value is None:
        raise SystemExit(f"{checkpoint} does not record tokens_per_sample; pass --tokens-per-sample")
    return int(value)


def evaluate_ppl(args) -> dict:
    root, prep = load_prepared(args.data)
    check_data_dir(prep["data_bin"], splits=("test",))
    if prep["kind"] != "lm":
        raise SystemExit(f"{root} holds a {prep['kind']} corpus; use `evaluate bleu`")
    expected = test_set_tokens(prep["data_bin"])
    if args.tokens_per_sample is None:
        args.tokens_per_sample = trained_tokens_per_sample(args.checkpoint)
    cmd = python_module_cmd("fairseq_cli.eval_lm") + [
        prep["data_bin"], "--path", str(args.checkpoint), "--user-dir", str(PLUGIN_DIR),
        "--gen-subset", "test", "--max-tokens", str(args.max_tokens),
        "--tokens-per-sample", str(args.tokens_per_sample), "--context-window", str(args.context_window),
        "--num-workers", "0", *_device_flags()]
    t0 = time.time()
    output = run_cmd(cmd)
    m_tok, m_ppl = _EVAL_LM.search(output), _PPL.search(output)
    if not (m_tok and m_ppl):
        raise SystemExit(f"could not read the token count / perplexity from fairseq-eval-lm:\n{output[-2000:]}")
    scored = int(m_tok.group(1).replace(",", ""))
    if scored != expected:
        raise SystemExit(f"fairseq-eval-lm scored {scored} tokens, the test set has {expected}; "
                         "some tokens were skipped (e.g. infinite scores); not reporting a PPL.")
    out = Path(args.out or Path(args.checkpoint).with_suffix(RECORDS["ppl"][0]))
    record = {"metric": "perplexity", "value": float(m_ppl.group(2)),
              "loss_base2": float(m_ppl.group(1)), "checkpoint": str(Path(args.checkpoint).resolve()),
              "data": str(root), "n_tokens_scored": scored, "n_test_tokens": expected,
              "context_window": args.context_window, "tokens_per_sample": args.tokens_per_sample,
              "command": args.command, "fairseq_command": " ".join(cmd),
              "git_commit": git_commit(), "hardware": hardware(), "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(out, record)
    log(f"test perplexity {record['value']} over {scored} tokens -> {out}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powernorm-evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="metric", required=True)
    b = sub.add_parser("bleu", help="translation: tokenized BLEU (paper) and detokenized sacreBLEU")
    b.add_argument("--recipe", choices=sorted(RECIPES), help="default: the prepared corpus's name")
    b.add_argument("--beam", type=int, help="default: the recipe's (IWSLT14 5, WMT14 4)")
    b.add_argument("--lenpen", type=float, help="default: the recipe's (IWSLT14 1.0, WMT14 0.6)")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--max-len-a", type=float, default=0.0,
                   help="hypothesis length limit a*src_len+b (fairseq's default 0*src+200)")
    b.add_argument("--max-len-b", type=int, default=200)
    lm = sub.add_parser("ppl", help="language modelling: fairseq-eval-lm test perplexity")
    lm.add_argument("--tokens-per-sample", type=int, default=None,
                    help="block length (default: the one the checkpoint was trained with; a longer "
                    "block than the model's positions makes fairseq-eval-lm skip every sample)")
    lm.add_argument("--context-window", type=int, default=0,
                    help="tokens of left context carried into each block (fairseq-eval-lm)")
    lm.add_argument("--max-tokens", type=int, default=4096)
    for s, metric in ((b, "bleu"), (lm, "ppl")):
        s.add_argument("--data", required=True, help="the prepared directory (or its data-bin)")
        s.add_argument("--checkpoint", required=True)
        record, beside = RECORDS[metric]
        s.add_argument("--out", help=f"the JSON record (default: <checkpoint>{record})"
                       + (f"; the translations go beside it ({', '.join(f'<record>{x}' for x in beside)}, "
                          "the record's suffix replaced)" if beside else ""))
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.command = invocation("powernorm_fairseq.pipeline.evaluate", argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint not found: {args.checkpoint}")
    args.checkpoint = Path(args.checkpoint).resolve()
    check_trained_for(args.checkpoint, args.metric)
    return evaluate_bleu(args) if args.metric == "bleu" else evaluate_ppl(args)


if __name__ == "__main__":
    main()

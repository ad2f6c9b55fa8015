#!/usr/bin/env python3
"""Step-for-step comparison of the IWSLT14 presets with the paper's released program.

    python scripts/compare_released.py --released PATH --data DATA_BIN [--norms power,batch,layer]

PATH is a checkout of https://github.com/sIncerass/powernorm (GPL-3.0, a fairseq 0.8 fork); DATA_BIN
a fairseq-preprocessed translation corpus with a joined dictionary (shared embeddings). Nothing of
PATH is copied here: it is imported at run time in its own process, with PATH first on the
import path (``PYTHONPATH``; both programs are packages named ``fairseq``), after the runtime shims listed in
the output (``RELEASED_SHIMS``) that let fairseq 0.8 import and run under Python 3.11 and torch 2.

For each norm (released ``--encoder-norm-self/-ff power|batch|layer``, decoder ``layer``, arch
``transformer_iwslt_de_en_v2``; ours ``configs/iwslt14_{pn,bn,ln}.yaml``) both programs run on
the same batches (built once from DATA_BIN by fairseq's batching, ``--max-tokens``), dropout 0,
``--warmup-updates`` shortened to ``--warmup`` (the learning rate and, as in the released program,
the PN warmup; the output norms keep the released 1000):

1. sites: every norm site's type, groups, warmup length and counter;
2. forward/backward from the same weights (the released initialization mapped into ours by
   :func:`powernorm_fairseq.models.released.map_released_state_dict`): loss, every gradient,
   every norm buffer, on ``--fwd-batches`` batches;
3. training: ``--updates`` optimizer updates with each program's own trainer, optimizer
   (Adam, weight decay), schedule (inverse_sqrt) and criterion, each on ``--update-freq``
   batches (gradient accumulation; PN's counter counts forwards): loss, grad norm, lr and norm
   buffers at every update, all parameters and buffers at the end;
4. resume: our trainer loads the released checkpoint of update ``--updates // 2`` (model,
   optimizer, schedule) and trains the remaining updates; our model loaded from the released
   final checkpoint gives the released eval-mode outputs on a valid batch;
5. averaging: our ``scripts/average_checkpoints.py`` on the last three released checkpoints
   against the released ``scripts/average_checkpoints.py``.

Both trainers run in ``--dtype`` (default float64: models, gradients and Adam states, after the
runtime shims ``FLOAT64_SHIMS``, each a no-op for float32), so rounding is ~1e-16 and ``--rtol``
checks the semantics over the whole trajectory. Every norm trains on the same padded batches:
the BN preset reproduces the released BN's pad filling (``bn_pad_statistics: released``).
``--float32-context DIR`` adds an earlier float32 run beside the LayerNorm control (context, not
checked).

Deviation = ``max|ours - released| / max|released|`` per tensor (scalars: relative difference);
the check passes when every deviation is <= ``--rtol`` (1e-5). Integer buffers must be equal,
except after averaging, where ours keeps the newest checkpoint's counters and the released script
divides them (integer division under the torch of 2019). Writes ``--out`` (JSON) and exits 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# the parts, beside this file (its directory is the first on the import path when it runs, and the
# released worker's only other one is the released checkout): never this package's fairseq
from compare_released_parts.shims import (
    DTYPES,
    FLOAT64_SHIMS,
    PRESETS,
    RELEASED_SHIMS,
    REPO,
    apply_released_shims,  # noqa: F401  (the tests read these through this script)
    clip_grad_norm_any_dtype,  # noqa: F401
    softmax_keeping_float64,  # noqa: F401
    step_in_param_dtype,  # noqa: F401
)
from compare_released_parts.verdict import compare, float32_context
from compare_released_parts.workers import (
    _update_freq,  # noqa: F401
    batches_worker,
    our_post_worker,
    our_worker,
    released_argv,  # noqa: F401
    released_post_worker,
    released_worker,
    train_loop,  # noqa: F401
)


def _run_worker(kind: str, spec: dict, threads: int) -> None:
    spec_path = Path(spec["work"]) / f"spec_{kind}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if kind.startswith("released"):  # the released checkout, never this repository, provides `fairseq`
        env["PYTHONPATH"] = spec["released"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, str(spec_path)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=spec["work"])
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode}); command: "
                         f"{' '.join(cmd)}")
    print(f"[compare_released] {kind} {spec.get('norm', '')}: {time.time() - t0:.0f} s",
          flush=True)


def parse_max_tokens(text: str, norms: list[str]) -> dict[str, int]:
    """``--max-tokens``: ``"N"`` for every norm, or ``"power=N,batch=M,..."`` naming each of
    ``norms``; returns {norm: tokens}."""
    try:
        if "=" not in text:
            out = dict.fromkeys(norms, int(text))
        else:
            out = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--max-tokens {text!r}: give N or NORM=N,... (e.g. "
                         "power=512,batch=256)") from None
    missing, extra = sorted(set(norms) - set(out)), sorted(set(out) - set(norms))
    if missing or extra or any(v < 1 for v in out.values()):
        raise SystemExit(f"--max-tokens {text!r}: needs a positive size for each of --norms "
                         f"{norms} (missing {missing}, not compared {extra})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--released", required=True, type=Path,
                   help="checkout of github.com/sIncerass/powernorm (the paper's released code)")
    p.add_argument("--data", required=True, type=Path,
                   help="fairseq data-bin of a de-en corpus with a joined dictionary")
    p.add_argument("--norms", default="power,batch,layer",
                   help="comma-separated encoder norms to compare (power, batch, layer)")
    p.add_argument("--updates", type=int, default=50, help="optimizer updates (default 50)")
    p.add_argument("--warmup", type=int, default=20,
                   help="--warmup-updates of both programs (lr, and PN in the released code)")
    p.add_argument("--max-tokens", default="4096",
                   help="tokens per batch: N for every norm, or NORM=N,... per norm "
                        "(e.g. power=512,batch=256,layer=256; default 4096)")
    p.add_argument("--update-freq", type=int, default=1,
                   help="batches (forward/backward passes) per optimizer update in both programs, "
                        "i.e. gradient accumulation; PN's step counter counts forwards (default 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="norms whose workers run at the same time (default 1)")
    p.add_argument("--fwd-batches", type=int, default=2,
                   help="batches of the forward/backward comparison, the first training batches "
                        "with source padding (default 2)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="dtype of the models, gradients and optimizer states of both trainers "
                        "(default float64: rounding ~1e-15, so --rtol checks the semantics over "
                        "the whole trajectory; float32 trajectories drift by rounding)")
    p.add_argument("--float32-context", type=Path, default=None,
                   help="--work DIR of an earlier --dtype float32 run, reported beside the LN "
                        "control as context (not a pass criterion)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per program")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch directory (default: a new temporary directory)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "equivalence" / "iwslt14.json")
    p.add_argument("--compare-only", action="store_true",
                   help="only compare the outputs already in --work (an earlier run's settings)")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--_worker":
        kind, spec_path = sys.argv[2], sys.argv[3]
        spec = json.loads(Path(spec_path).read_text())
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        {"released": released_worker, "ours": our_worker, "batches": batches_worker,
         "released_post": released_post_worker, "ours_post": our_post_worker}[kind](spec)
        return 0
    args = build_parser().parse_args(argv)
    # here, not at the top: the released worker runs this file too, beside fairseq 0.8
    from powernorm_fairseq.pipeline.common import checkout_commit, git_commit, hardware

    released = args.released.resolve()
    if not (released / "fairseq" / "modules" / "norms" / "mask_powernorm.py").is_file():
        raise SystemExit(f"--released {released}: not a checkout of sIncerass/powernorm (no "
                         "fairseq/modules/norms/mask_powernorm.py); git clone it and pass its path")
    data = args.data.resolve()
    if not (data / "dict.de.txt").is_file() or not (data / "dict.en.txt").is_file():
        raise SystemExit(f"--data {data}: no dict.de.txt/dict.en.txt; pass a fairseq data-bin "
                         "of a de-en corpus (e.g. scripts/prepare_multi30k.sh)")
    if (data / "dict.de.txt").read_bytes() != (data / "dict.en.txt").read_bytes():
        raise SystemExit(f"--data {data}: the dictionaries differ; shared embeddings need a "
                         "joined dictionary (fairseq-preprocess --joined-dictionary)")
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    bad = [n for n in norms if n not in PRESETS]
    if bad:
        raise SystemExit(f"--norms: unknown {bad}; choose from {sorted(PRESETS)}")
    if args.updates < 4 or args.warmup >= args.updates:
        raise SystemExit("--updates must be >= 4 and larger than --warmup (both PN paths)")
    if args.update_freq < 1:
        raise SystemExit(f"--update-freq {args.update_freq}: must be >= 1")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be >= 1")
    max_tokens = parse_max_tokens(args.max_tokens, norms)
    root = Path(tempfile.mkdtemp(prefix="compare_released_")) if args.work is None else args.work
    root.mkdir(parents=True, exist_ok=True)
    common = {"released": str(released), "data": str(data), "updates": args.updates,
              "warmup": args.warmup, "fwd_batches": args.fwd_batches,
              "resume_at": max(args.updates // 2, args.updates - 10), "dtype": args.dtype,
              "update_freq": args.update_freq}

    def batch_files(tokens: int) -> dict:  # one set of shared batches per --max-tokens
        d = root / f"tokens{tokens}"
        return {"max_tokens": tokens, "work": str(d), **{
            k: str(d / f"{k}.pt") for k in ("batches", "fwd", "valid")}}

    t0 = time.time()
    if args.compare_only:
        if args.work is None:
            raise SystemExit("--compare-only needs --work DIR of an earlier run")
    else:
        for tokens in sorted(set(max_tokens.values())):
            Path(batch_files(tokens)["work"]).mkdir(exist_ok=True)
            _run_worker("batches", dict(common, **batch_files(tokens)), args.threads)
    record = {"command": "python scripts/compare_released.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "released_commit": checkout_commit(released), "our_commit": git_commit(),
              "hardware": hardware(args.threads),  # with the torch and python versions
              "shims": RELEASED_SHIMS, "float64_shims": FLOAT64_SHIMS, "rtol": args.rtol,
              "deviation": "max|ours - released| / max|released| per tensor; integers must be "
                           "equal",
              "settings": dict(common, max_tokens=max_tokens, jobs=args.jobs),
              "data": str(data), "compare_only": args.compare_only, "norms": {}}

    def spec_of(norm: str) -> dict:
        files = batch_files(max_tokens[norm])
        spec = dict(common, **files)
        spec.update(norm=norm, work=str(root / norm))
        return spec

    def run_norm(norm: str) -> None:
        spec = spec_of(norm)
        Path(spec["work"]).mkdir(exist_ok=True)
        _run_worker("released", spec, args.threads)
        _run_worker("ours", spec, args.threads)
        if norm == "power":
            _run_worker("released_post", spec, args.threads)
            _run_worker("ours_post", spec, args.threads)

    if not args.compare_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run_norm, norms))  # list(): a failed worker raises here
    for norm in norms:
        work = root / norm
        result = compare(norm, work, args.rtol, args.dtype)
        record["norms"][norm] = result
        tr, rs = result["training"], result["resume"]
        print(f"[compare_released] {norm}: checks {result['checks']}\n"
              f"  fwd/bwd float64 max dev: " + ", ".join(
                  f"loss {r['loss']:.2e} grads {r['grads']:.2e} buffers {r['buffers']:.2e}"
                  for r in result["forward_backward_float64"]) + "\n"
              "  fwd/bwd max dev: " + ", ".join(
                  f"loss {r['loss']:.2e} grads {r['grads']:.2e} buffers {r['buffers']:.2e}"
                  for r in result["forward_backward"]) + "\n"
              f"  training {tr['updates']} updates max dev: " + ", ".join(
                  f"{k} {v:.2e}" for k, v in tr["max"].items()) +
              f"; final params/buffers {tr['final_params_and_buffers']:.2e}\n"
              f"  resume from {rs['from_update']}: " + ", ".join(
                  f"{k} {v:.2e}" for k, v in rs["max"].items()) +
              f"; eval logits {rs['eval_logits']:.2e}\n"
              f"  averaging: float tensors {result['averaging']['float_tensors']:.2e}",
              flush=True)
    if args.float32_context is not None:
        ctx = record["float32_context"] = float32_context(args.float32_context.resolve(),
                                                          args.rtol)
        for n in PRESETS:
            if n in ctx:
                print(f"[compare_released] float32 context {n}: max dev " + ", ".join(
                    f"{k} {v:.2e}" for k, v in ctx[n]["max"].items() if isinstance(v, float)) +
                    "; x LN control: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in ctx[n]["ratio_to_layer"].items() if v), flush=True)
    record["wall_s"] = round(time.time() - t0)
    record["passed"] = all(r["passed"] for r in record["norms"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"[compare_released] shims: {', '.join(RELEASED_SHIMS)}")
    print(f"[compare_released] float64 shims: {', '.join(FLOAT64_SHIMS)}")
    print(f"[compare_released] {'PASSED' if record['passed'] else 'FAILED'} (rtol {args.rtol}); "
          f"record: {args.out}")
    return 0 if record["passed"] else 1



if __name__ == "__main__":
    sys.exit(main())

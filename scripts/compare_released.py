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
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"power": "iwslt14_pn", "batch": "iwslt14_bn", "layer": "iwslt14_ln"}
RELEASED_ARCH = "transformer_iwslt_de_en_v2"
NORM_BUFFERS = ("running_phi", "ema_gz", "iters", "running_mean", "running_var",
                "num_batches_tracked", "num_unstable")
#: PN step counter set for the post-warmup forward/backward (past every site's warmup).
POST_WARMUP_ITERS = 10**6
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SITE_ATTRS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm")

#: Runtime shims applied in the released program's process only (name: why).
RELEASED_SHIMS = {
    "numpy.float": "numpy >= 1.24 removed the alias np.float that fairseq 0.8's "
                   "indexed_dataset.py uses in its dtype table; set to the builtin float",
    "torch.load weights_only=False": "torch >= 2.6 loads with weights_only=True by default; "
                                     "fairseq 0.8 checkpoints pickle an argparse Namespace",
    "autograd ctx.saved_variables": "removed from torch; MaskPowerNorm's backward reads it, "
                                    "aliased to ctx.saved_tensors (same tensors)",
    "integer Tensor.div_ (averaging only)": "torch < 1.5 divided integer tensors in place with "
                                            "floor division, torch 2 raises; the released "
                                            "average_checkpoints.py divides every tensor, "
                                            "counters included",
}


#: Runtime shims of the float64 comparison (name: why). Each one acts on float64 tensors only and
#: leaves every float32 computation as it was; both processes list the ones they applied.
FLOAT64_SHIMS = {
    "softmax/log_softmax keep float64 (both programs)":
        "fairseq 0.8's and 0.12's utils.softmax/log_softmax pass dtype=torch.float32 (fp16 "
        "safety), which would compute the output log-probabilities of a float64 model in "
        "float32; for float64 inputs they compute in float64, other inputs take the original",
    "float64 gradient norm (ours)":
        "fairseq 0.12's utils.clip_grad_norm_ takes every per-tensor norm with "
        "dtype=torch.float32, which torch refuses for float64 gradients; for float64 gradients "
        "the norm is sqrt(sum_p ||g_p||^2) in float64 (clipping as fairseq's), other gradients "
        "take the original",
    "Adam in the parameters' dtype (released)":
        "fairseq 0.8's Adam.step works on p.grad.float() and p.data.float() and copies back, i.e. "
        "in float32 for float64 parameters; during its step Tensor.float() returns a float64 "
        "tensor unchanged (for float32 tensors .float() is the identity anyway)",
}


# --------------------------------------------------------------------------------------- utils

def _dump(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _norm_buffers(model) -> dict:
    out = {}
    for name, buf in model.named_buffers():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[-1] in NORM_BUFFERS and parts[-2] in SITE_ATTRS:
            out[name] = buf.detach().clone()
    return out


def _batches(path: Path) -> list[dict]:
    return _load(path)


# ------------------------------------------------------------------------- released program

def apply_released_shims(released: Path) -> list[str]:
    """Patch what fairseq 0.8 needs (see ``RELEASED_SHIMS``) in a worker whose ``PYTHONPATH``
    starts with ``released`` (``_run_worker``); returns the shim names."""
    import importlib.util

    import numpy as np

    found = importlib.util.find_spec("fairseq")  # where `import fairseq` will come from, unrun
    if found is None or not Path(found.origin).resolve().is_relative_to(released.resolve()):
        raise SystemExit(f"the released worker would import fairseq from {found and found.origin}, "
                         f"not from {released}: start it through _run_worker (PYTHONPATH={released})")
    if not hasattr(np, "float") or np.float is not float:  # numpy >= 1.24
        np.float = float
    load = torch.load

    def load_full(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return load(*args, **kwargs)

    torch.load = load_full
    from torch.autograd.function import BackwardCFunction

    if not hasattr(BackwardCFunction, "saved_variables"):
        BackwardCFunction.saved_variables = property(lambda ctx: ctx.saved_tensors)
    import fairseq

    if Path(fairseq.__file__).resolve().parents[1] != released.resolve():
        raise SystemExit(f"--released {released}: imported fairseq from {fairseq.__file__}, not "
                         "from the released checkout")
    return list(RELEASED_SHIMS)


def softmax_keeping_float64(original, torch_fn):
    """``fairseq.utils.softmax``/``log_softmax`` (``original``) that computes a float64 ``x``
    in float64 with ``torch_fn`` (``F.softmax``/``F.log_softmax``) instead of float32."""

    def softmax(x, dim, onnx_trace=False):
        if x.dtype == torch.float64:
            return torch_fn(x, dim=dim)
        return original(x, dim, onnx_trace=onnx_trace)

    return softmax


def clip_grad_norm_any_dtype(original):
    """fairseq 0.12's ``utils.clip_grad_norm_`` (``original``) extended to float64 gradients.

    For float64 gradients ``g_p``: ``total = sqrt(sum_p ||g_p||_2^2)`` in float64, then, when
    ``max_norm > 0``, every gradient is scaled by ``min(1, max_norm / (total + 1e-6))`` (fairseq's
    clipping). Any other gradients go to ``original`` unchanged. Returns ``total`` (0-dim tensor).
    """

    @torch.no_grad()
    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        grads = [p.grad.detach() for p in params
                 if p is not None and getattr(p, "grad", None) is not None]
        if not grads or any(g.dtype != torch.float64 for g in grads):
            return original(params, max_norm, aggregate_norm_fn)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if aggregate_norm_fn is not None:
            total = aggregate_norm_fn(total)
        if max_norm > 0:
            torch._foreach_mul_(grads, (float(max_norm) / (total + 1e-6)).clamp_(max=1))
        return total

    return clip_grad_norm_


@contextlib.contextmanager
def float_keeps_float64():
    """``Tensor.float()`` returns a float64 tensor itself (not a float32 copy) inside the block."""
    own = "float" in torch.Tensor.__dict__
    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        if self.dtype == torch.float64 and not args and not kwargs:
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.float = float_
    try:
        yield
    finally:
        if own:
            torch.Tensor.float = original
        else:
            del torch.Tensor.float


def step_in_param_dtype(step):
    """An optimizer ``step`` run under :func:`float_keeps_float64`."""

    def wrapped(self, closure=None):
        with float_keeps_float64():
            return step(self, closure)

    return wrapped


def apply_float64_shims(side: str) -> list[str]:
    """Apply ``FLOAT64_SHIMS`` to the ``fairseq`` imported in this process (``side``: ``ours``
    or ``released``); returns the names applied."""
    import torch.nn.functional as F
    from fairseq import utils

    utils.softmax = softmax_keeping_float64(utils.softmax, F.softmax)
    utils.log_softmax = softmax_keeping_float64(utils.log_softmax, F.log_softmax)
    names = ["softmax/log_softmax keep float64 (both programs)"]
    if side == "ours":
        utils.clip_grad_norm_ = clip_grad_norm_any_dtype(utils.clip_grad_norm_)
        names.append("float64 gradient norm (ours)")
    else:
        from fairseq.optim import adam

        adam.Adam.step = step_in_param_dtype(adam.Adam.step)
        names.append("Adam in the parameters' dtype (released)")
    return names


@contextlib.contextmanager
def legacy_integer_div():
    """Integer ``Tensor.div_`` as floor division (torch < 1.5), for the released averaging."""
    div_ = torch.Tensor.div_

    def floor_div_(self, other, *args, **kwargs):
        if not (self.is_floating_point() or self.is_complex()) and not args and not kwargs:
            return self.floor_divide_(other)
        return div_(self, other, *args, **kwargs)

    torch.Tensor.div_ = floor_div_
    try:
        yield
    finally:
        torch.Tensor.div_ = div_


def released_argv(spec: dict) -> list[str]:
    """The released ``trans-scripts/train/train-iwslt14.sh`` command line, with the comparison's
    changes (dropout 0, shortened warmup, CPU, ``--max-tokens``)."""
    norm = spec["norm"]
    return [
        spec["data"], "-s", "de", "-t", "en", "--seed", "1",
        "--arch", RELEASED_ARCH, "--share-all-embeddings",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--encoder-norm-self", norm, "--decoder-norm-self", "layer",
        "--encoder-norm-ff", norm, "--decoder-norm-ff", "layer",
        "--dropout", "0", "--attention-dropout", "0", "--relu-dropout", "0",
        "--lr-scheduler", "inverse_sqrt", "--warmup-init-lr", "1e-07",
        "--warmup-updates", str(spec["warmup"]), "--lr", "0.0015", "--min-lr", "1e-09",
        "--label-smoothing", "0.1", "--weight-decay", "0.0001",
        "--max-tokens", str(spec["max_tokens"]), "--update-freq", str(_update_freq(spec)),
        "--ddp-backend", "no_c10d", "--criterion", "label_smoothed_cross_entropy",
        "--save-dir", spec["work"], "--cpu",
    ]


def released_sites(model) -> list[dict]:
    """The released model's norm sites in the format of ``norm_sites`` (duck-typed)."""
    sites = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in SITE_ATTRS or m is None:
            continue
        cls = type(m).__name__
        entry = {"site": name, "groups": 0, "warmup": None, "counter": None}
        if cls == "MaskPowerNorm":
            entry.update(type="power", variant="reference", groups=m.group_num,
                         warmup=m.warmup_iters,
                         counter={"name": "iters", "value": int(m.iters[0]),
                                  "per": "training forward"})
        elif cls == "MaskSyncBatchNorm":
            # pads: its forward fills pad rows with the real rows' mean (docs/SPEC.md section 4)
            entry.update(type="batch", groups=1, momentum=m.momentum, pads="released",
                         counter={"name": "num_batches_tracked",
                                  "value": int(m.num_batches_tracked), "per": "training forward"})
        elif cls == "LayerNorm":
            entry.update(type="layer")
        else:
            entry.update(type=cls)
        sites.append(entry)
    return sites


def released_worker(spec: dict) -> None:
    released, work = Path(spec["released"]), Path(spec["work"])
    shims = apply_released_shims(released) + apply_float64_shims("released")
    import numpy as np
    from fairseq import options, tasks
    from fairseq.trainer import Trainer

    args = options.parse_args_and_arch(options.get_training_parser(), released_argv(spec))
    # --relu-dropout is an alias of --activation-dropout; a 0 there makes the layers fall back
    # to args.relu_dropout, which transformer_iwslt_de_en_v2 sets to 0.1: no flag turns the
    # FFN dropout off, so the comparison sets the attribute.
    args.relu_dropout = 0.0
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    task = tasks.setup_task(args)
    model = task.build_model(args).to(DTYPES[spec["dtype"]])
    criterion = task.build_criterion(args)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _dump(init, work / "init.pt")
    result = {"shims": shims, "sites": released_sites(model), "argv": released_argv(spec)}
    batches = _batches(Path(spec["batches"]))
    fwd_bwd(copy.deepcopy(model).double(), criterion, _batches(Path(spec["fwd"])),
            work / "fwdbwd64.pt")
    fwd_bwd(copy.deepcopy(model).float(), criterion, _batches(Path(spec["fwd"])),
            work / "fwdbwd.pt")

    trainer = Trainer(args, task, model, criterion)

    def step(samples):
        lr = trainer.get_lr()
        log = trainer.train_step(samples)
        return {"loss": float(log["loss"]), "nll_loss": float(log["nll_loss"]),
                "gnorm": float(trainer.get_meter("gnorm").val), "lr": float(lr),
                "sample_size": int(log["sample_size"]), "num_updates": trainer.get_num_updates()}

    def save(name):
        trainer.save_checkpoint(str(work / name), {})

    train_loop(step, model, batches, spec, save, work / "train_released.pt")
    eval_outputs(model, _batches(Path(spec["valid"])), work / "eval_released.pt")

    from importlib.util import module_from_spec, spec_from_file_location

    loader = spec_from_file_location("released_average_checkpoints",
                                     released / "scripts" / "average_checkpoints.py")
    average = module_from_spec(loader)
    loader.loader.exec_module(average)
    with legacy_integer_div():
        averaged = average.average_checkpoints([str(work / n) for n in avg_names(spec)])
    _dump(averaged["model"], work / "average_released.pt")
    (work / "released.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------ both programs

def fwd_bwd(model, criterion, batches, out: Path) -> None:
    """Loss, gradients (of the summed loss) and norm buffers after each batch, no update."""
    model.train()
    records = []
    for sample in batches:
        model.zero_grad()
        loss, sample_size, _ = criterion(model, sample)
        loss.backward()
        records.append({
            "loss": float(loss), "sample_size": int(sample_size),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None},
            "buffers": _norm_buffers(model)})
    model.zero_grad()
    _dump(records, out)


def avg_names(spec: dict) -> list[str]:
    return [f"checkpoint{i}.pt" for i in (1, 2, 3)]


def _update_freq(spec: dict) -> int:
    return int(spec.get("update_freq", 1))  # records before --update-freq ran with 1


def train_loop(step, model, batches, spec, save, out: Path, start: int = 0) -> None:
    """``step(samples)`` for updates ``start+1 .. --updates``, each on the next ``--update-freq``
    batches (gradient accumulation); records every update, saves the resume checkpoint and the
    three averaging checkpoints (the last three updates)."""
    updates, k = spec["updates"], _update_freq(spec)
    records = []
    for i in range(start, updates):
        rec = step(batches[i * k:(i + 1) * k])
        rec["buffers"] = _norm_buffers(model)
        records.append(rec)
        if save is not None:
            if i + 1 == spec["resume_at"]:
                save("checkpoint_resume.pt")
            if i + 1 > updates - 3:
                save(avg_names(spec)[i + 3 - updates])
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _dump({"records": records, "final": final}, out)


@torch.no_grad()
def eval_outputs(model, batches, out: Path) -> None:
    """Eval-mode decoder outputs (logits) on ``batches``."""
    model.eval()
    logits = [model(**s["net_input"])[0].clone() for s in batches]
    model.train()
    _dump(logits, out)


def fwd_bwd_post_warmup(model, criterion, batches, out: Path) -> None:
    """:func:`fwd_bwd` in float64 with every PN counter (``iters``) moved past its warmup, so the
    running-statistic forward (``running_phi``) and its backward are compared too."""
    model = model.double()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(".iters"):
                buf.fill_(POST_WARMUP_ITERS)
    fwd_bwd(model, criterion, batches, out)


def released_post_worker(spec: dict) -> None:
    """The released model from ``init.pt``, float64, past the PN warmup (fwd/bwd only)."""
    work = Path(spec["work"])
    apply_released_shims(Path(spec["released"]))
    apply_float64_shims("released")
    from fairseq import options, tasks

    args = options.parse_args_and_arch(options.get_training_parser(), released_argv(spec))
    args.relu_dropout = 0.0  # as released_worker
    task = tasks.setup_task(args)
    model = task.build_model(args)
    model.load_state_dict(_load(work / "init.pt"))
    fwd_bwd_post_warmup(model, task.build_criterion(args), _batches(Path(spec["fwd"])),
                        work / "fwdbwd64_post.pt")


def our_post_worker(spec: dict) -> None:
    """Our model from the released ``init.pt``, float64, past the PN warmup (fwd/bwd only)."""
    from fairseq import tasks

    import powernorm_fairseq  # noqa: F401
    from powernorm_fairseq.models.released import map_released_state_dict

    apply_float64_shims("ours")
    work = Path(spec["work"])
    cfg, _ = our_cfg(spec)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(map_released_state_dict(_load(work / "init.pt")), strict=True)
    fwd_bwd_post_warmup(model, task.build_criterion(cfg.criterion), _batches(Path(spec["fwd"])),
                        work / "fwdbwd64_post_ours.pt")


# ------------------------------------------------------------------------------ our program

def our_cfg(spec: dict):
    """The preset of ``spec['norm']`` with the comparison's overrides, as fairseq-hydra-train
    builds it."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    name = PRESETS[spec["norm"]]
    overrides = [f"task.data={spec['data']}", f"lr_scheduler.warmup_updates={spec['warmup']}",
                 "model.dropout=0.0", "model.attention_dropout=0.0",
                 "model.activation_dropout=0.0", f"dataset.max_tokens={spec['max_tokens']}",
                 "common.cpu=true", f"checkpoint.save_dir={spec['work']}"]
    if spec["norm"] == "power":  # released: the PN warmup is --warmup-updates
        overrides.append(f"model.pn_warmup_updates={spec['warmup']}")
    if _update_freq(spec) != 1:
        overrides.append(f"optimization.update_freq=[{_update_freq(spec)}]")
    hydra_init(name)
    GlobalHydra.instance().clear()
    from powernorm_fairseq.presets import config_dir

    with initialize_config_dir(config_dir=str(config_dir())):
        cfg = compose(name, overrides=[o for o in overrides if not o.startswith("model.")])
    add_defaults(cfg)  # the model's fields exist from here on
    with open_dict(cfg):
        for o in overrides:
            if o.startswith("model."):
                key, value = o[len("model."):].split("=")
                cfg.model[key] = float(value) if "." in value else int(value)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg, overrides


def our_worker(spec: dict) -> None:
    from fairseq import tasks
    from fairseq.logging import metrics
    from fairseq.trainer import Trainer
    from omegaconf import OmegaConf

    import powernorm_fairseq  # noqa: F401  (after fairseq: registers the models and criteria)
    from powernorm_fairseq.models.released import (
        load_released_checkpoint,
        map_released_state_dict,
        norm_sites,
    )

    shims = apply_float64_shims("ours")
    work = Path(spec["work"])
    cfg, overrides = our_cfg(spec)
    task = tasks.setup_task(cfg.task)

    def build():
        model = task.build_model(cfg.model).to(DTYPES[spec["dtype"]])
        model.load_state_dict(map_released_state_dict(_load(work / "init.pt")), strict=True)
        return model, task.build_criterion(cfg.criterion)

    model, criterion = build()
    result = {"preset": PRESETS[spec["norm"]], "overrides": overrides, "shims": shims,
              "sites": norm_sites(model), "criterion": type(criterion).__name__}
    batches = _batches(Path(spec["batches"]))
    fwd_bwd(copy.deepcopy(model).double(), criterion, _batches(Path(spec["fwd"])),
            work / "fwdbwd64_ours.pt")
    fwd_bwd(copy.deepcopy(model).float(), criterion, _batches(Path(spec["fwd"])),
            work / "fwdbwd_ours.pt")

    def make_step(trainer):
        def step(samples):
            lr = trainer.get_lr()
            with metrics.aggregate(new_root=True) as agg:
                trainer.train_step(samples)
            return {"loss": float(agg["loss"].avg), "nll_loss": float(agg["nll_loss"].avg),
                    "gnorm": float(agg["gnorm"].avg), "lr": float(lr),
                    "sample_size": int(agg["sample_size"].sum)
                    if "sample_size" in agg else None,
                    "num_updates": trainer.get_num_updates()}
        return step

    model, criterion = build()
    trainer = Trainer(cfg, task, model, criterion)
    train_loop(make_step(trainer), model, batches, spec, None, work / "train_ours.pt")

    # resume: the released checkpoint of update resume_at (model, optimizer, lr schedule)
    ckpt = load_released_checkpoint(work / "checkpoint_resume.pt")
    ckpt.pop("args", None)
    ckpt["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # fairseq's form
    _dump(ckpt, work / "checkpoint_resume_ours.pt")
    model, criterion = build()
    trainer = Trainer(cfg, task, model, criterion)
    trainer.load_checkpoint(str(work / "checkpoint_resume_ours.pt"))
    result["resume_num_updates"] = trainer.get_num_updates()
    train_loop(make_step(trainer), model, batches, spec, None, work / "resume_ours.pt",
               start=spec["resume_at"])

    # the released final checkpoint in eval mode
    last = load_released_checkpoint(work / avg_names(spec)[-1])
    model, _ = build()
    model.load_state_dict(last["model"], strict=True)
    eval_outputs(model, _batches(Path(spec["valid"])), work / "eval_ours.pt")

    # ours averaging the released-format checkpoints
    subprocess.run([sys.executable, str(REPO / "scripts" / "average_checkpoints.py"),
                    "--inputs", *[str(work / n) for n in avg_names(spec)],
                    "--output", str(work / "average_ours.pt")], check=True)
    (work / "ours.json").write_text(json.dumps(result, indent=1))


def _plain(sample: dict) -> dict:
    """A fairseq translation batch as a plain dict of the tensors both programs read."""
    return {"id": sample["id"], "nsentences": sample["nsentences"], "ntokens": sample["ntokens"],
            "target": sample["target"],
            "net_input": {k: sample["net_input"][k] for k in
                          ("src_tokens", "src_lengths", "prev_output_tokens")}}


def batches_worker(spec: dict) -> None:
    """The shared batches: fairseq's training batches of DATA (shuffled with seed 1, epoch 1,
    ``--max-tokens``), the first ``--fwd-batches`` of them with source padding (the
    forward/backward check) and one valid batch, as plain dicts of CPU tensors."""
    from fairseq import tasks

    import powernorm_fairseq  # noqa: F401

    cfg, _ = our_cfg(dict(spec, norm="layer"))
    task = tasks.setup_task(cfg.task)
    out = {}
    n_train = spec["updates"] * _update_freq(spec)  # one batch per forward
    for split, count, shuffle in (("train", n_train, True), ("valid", 1, False)):
        task.load_dataset(split)
        itr = task.get_batch_iterator(dataset=task.dataset(split), max_tokens=spec["max_tokens"],
                                      max_positions=(1024, 1024), seed=1, epoch=1,
                                      ignore_invalid_inputs=True).next_epoch_itr(shuffle=shuffle)
        samples, padded = [], []
        for sample in itr:
            plain = _plain(sample)
            if len(samples) < count:
                samples.append(plain)
            pad = task.source_dictionary.pad()
            if split == "train" and len(padded) < spec["fwd_batches"] and bool(
                    plain["net_input"]["src_tokens"].eq(pad).any()):
                padded.append(plain)
            if len(samples) == count and (split != "train" or len(padded) == spec["fwd_batches"]):
                break
        if len(samples) < count or (split == "train" and len(padded) < spec["fwd_batches"]):
            raise SystemExit(f"--data {spec['data']}: {split} gives {len(samples)} batches of "
                             f"--max-tokens {spec['max_tokens']} ({len(padded)} with source "
                             f"padding), {count} ({spec['fwd_batches']}) needed")
        out[split] = samples
        if split == "train":
            out["fwd"] = padded
    _dump(out["train"], Path(spec["batches"]))
    _dump(out["valid"], Path(spec["valid"]))
    _dump(out["fwd"], Path(spec["fwd"]))


# -------------------------------------------------------------------------------- comparison

def deviation(ours, theirs) -> float:
    """``max|a - b| / max|b|`` (0 when both are 0); integers: 0 if equal else inf."""
    if isinstance(theirs, torch.Tensor):
        a, b = ours.detach().to(torch.float64), theirs.detach().to(torch.float64)
        if a.shape != b.shape:
            return math.inf
        if not (ours.is_floating_point() or theirs.is_floating_point()):
            return 0.0 if torch.equal(a, b) else math.inf
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a - b).abs().max().item() if b.numel() else 0.0
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if isinstance(theirs, int) and isinstance(ours, int):
        return 0.0 if ours == theirs else math.inf
    scale = abs(theirs)
    return abs(ours - theirs) / scale if scale > 0 else (0.0 if ours == theirs else math.inf)


#: Parameters whose gradient is zero in exact arithmetic: softmax(q.(k + b)) = softmax(q.k) over
#: the keys, so the key-projection bias never changes an output. Their float32 gradients are
#: rounding noise (which Adam scales to lr-sized steps of random sign); reported, not checked.
EXEMPT = (".k_proj.bias",)


def max_dev(ours: dict, theirs: dict, rename, exempt=None) -> tuple[float, str, list[str]]:
    """Largest deviation over the released keys (renamed to ours), ``EXEMPT`` keys left out
    (their largest deviation goes to ``exempt["max"]`` when given); unmatched keys listed."""
    worst, where, missing = 0.0, "", []
    for key, value in theirs.items():
        k = rename(key)
        if k is None:
            continue
        if key.endswith(EXEMPT):
            if exempt is not None and k in ours:
                exempt["max"] = max(exempt.get("max", 0.0), deviation(ours[k], value))
            continue
        if k not in ours:
            missing.append(key)
            continue
        d = deviation(ours[k], value)
        if d > worst or (math.isnan(d) and not math.isnan(worst)):
            worst, where = d, k
    return worst, where, missing


def compare_sites(ours: list[dict], theirs: list[dict]) -> list[dict]:
    diffs = []
    by_site = {s["site"]: s for s in ours}
    for t in theirs:
        o = by_site.get(t["site"])
        if o is None:
            diffs.append({"site": t["site"], "released": t, "ours": None})
            continue
        for field in ("type", "groups", "warmup"):
            if o.get(field) != t.get(field):
                diffs.append({"site": t["site"], "field": field, "released": t.get(field),
                              "ours": o.get(field)})
        tc, oc = t.get("counter"), o.get("counter")
        if (tc is None) != (oc is None) or (tc and oc and (tc["name"], tc["value"], tc["per"]) !=
                                            (oc["name"], oc["value"], oc["per"])):
            diffs.append({"site": t["site"], "field": "counter", "released": tc, "ours": oc})
    extra = set(by_site) - {t["site"] for t in theirs}
    diffs += [{"site": s, "released": None, "ours": by_site[s]} for s in sorted(extra)]
    return diffs


def compare_records(ours: list[dict], theirs: list[dict], rename) -> list[dict]:
    rows = []
    for o, t in zip(ours, theirs, strict=True):
        row = {"update": t["num_updates"]}
        for key in ("loss", "nll_loss", "gnorm", "lr"):
            row[key] = deviation(o[key], t[key])
        row["buffers"], row["buffers_at"], _ = max_dev(o["buffers"], t["buffers"], rename)
        row["num_updates"] = deviation(o["num_updates"], t["num_updates"])
        rows.append(row)
    return rows


def summarize(rows: list[dict], keys) -> dict:
    return {k: max((r[k] for r in rows), default=0.0) for k in keys}


def compare(norm: str, work: Path, rtol: float, dtype: str = "float64") -> dict:
    """The record of one norm from the workers' outputs in ``work``; ``dtype``: the dtype the
    training ran in. In float64 the float32 forward/backward is reported, not checked (rounding
    of float32 is the float32 context's subject, :func:`float32_context`)."""
    from powernorm_fairseq.models.released import map_released_state_dict

    def rename(key):  # released key -> ours; None = not in ours: BN counters (dropped by the
        # mapping) and fairseq 0.8's placeholder buffer embed_positions._float_tensor (fairseq
        # 0.12 does not save it)
        return None if key.endswith((".num_batches_tracked", "._float_tensor")) else key

    rel, ours = json.loads((work / "released.json").read_text()), json.loads(
        (work / "ours.json").read_text())
    out: dict = {"norm": norm, "preset": ours["preset"], "overrides": ours["overrides"],
                 "released_argv": rel["argv"], "criterion": ours["criterion"]}
    out["sites"] = {"released": rel["sites"], "ours": ours["sites"],
                    "differences": compare_sites(ours["sites"], rel["sites"])}
    # Counters the released program has and we do not (BN num_batches_tracked) are listed, not
    # failed: it is never read (fixed momentum).
    out["sites"]["differences_failing"] = [
        d for d in out["sites"]["differences"]
        if not (d.get("field") == "counter" and d["released"] and
                d["released"]["name"] == "num_batches_tracked" and d["ours"] is None)]

    init = _load(work / "init.pt")
    mapped = map_released_state_dict(init)
    out["mapping"] = {"released_keys": len(init), "our_keys": len(mapped),
                      "dropped": sorted(set(init) - set(mapped)),
                      "added": sorted(set(mapped) - set(init))}

    def fwd_rows(ours_file, released_file):
        rows = []
        for o, t in zip(_load(work / ours_file), _load(work / released_file), strict=True):
            ex: dict = {}
            g, g_at, g_missing = max_dev(o["grads"], t["grads"], rename, ex)
            b, b_at, _ = max_dev(o["buffers"], t["buffers"], rename)
            rows.append({"loss": deviation(o["loss"], t["loss"]), "grads": g, "grads_at": g_at,
                         "grads_missing": g_missing, "grads_exempt": ex.get("max"),
                         "buffers": b, "buffers_at": b_at,
                         "sample_size": deviation(o["sample_size"], t["sample_size"])})
        return rows

    fb = fwd_rows("fwdbwd_ours.pt", "fwdbwd.pt")
    fb64 = fwd_rows("fwdbwd64_ours.pt", "fwdbwd64.pt")
    if (work / "fwdbwd64_post.pt").is_file():  # PN: past the warmup as well
        fb64 += [dict(r, phase="post-warmup") for r in
                 fwd_rows("fwdbwd64_post_ours.pt", "fwdbwd64_post.pt")]
    out["forward_backward"] = fb
    out["forward_backward_float64"] = fb64

    tr_rel, tr_ours = _load(work / "train_released.pt"), _load(work / "train_ours.pt")
    rows = compare_records(tr_ours["records"], tr_rel["records"], rename)
    final_rel = {k: v for k, v in tr_rel["final"].items()}
    ex = {}
    p, p_at, p_missing = max_dev(tr_ours["final"], final_rel, rename, ex)
    keys = ("loss", "nll_loss", "gnorm", "lr", "buffers", "num_updates")
    out["training"] = {"updates": len(rows), "max": summarize(rows, keys), "per_update": rows,
                       "final_params_and_buffers": p, "final_at": p_at,
                       "final_missing": p_missing, "final_exempt": ex.get("max"),
                       "released_loss": [r["loss"] for r in tr_rel["records"]],
                       "released_lr": [r["lr"] for r in tr_rel["records"]],
                       "released_gnorm": [r["gnorm"] for r in tr_rel["records"]]}

    res = _load(work / "resume_ours.pt")
    start = len(tr_rel["records"]) - len(res["records"])
    res_rows = compare_records(res["records"], tr_rel["records"][start:], rename)
    ex = {}
    rp, rp_at, _ = max_dev(res["final"], final_rel, rename, ex)
    ev_rel, ev_ours = _load(work / "eval_released.pt"), _load(work / "eval_ours.pt")
    out["resume"] = {"from_update": ours["resume_num_updates"], "updates": len(res_rows),
                     "max": summarize(res_rows, keys), "final_params_and_buffers": rp,
                     "final_at": rp_at, "final_exempt": ex.get("max"),
                     "eval_logits": max(deviation(o, t) for o, t in zip(ev_ours, ev_rel,
                                                                       strict=True))}

    av_rel = _load(work / "average_released.pt")
    av_ours = _load(work / "average_ours.pt")["model"]
    floats = {k: v for k, v in av_rel.items() if v.is_floating_point()}
    a, a_at, a_missing = max_dev(av_ours, floats, rename)
    ints = {k: {"released": v.tolist(), "ours": av_ours[rename(k)].tolist()
                if rename(k) is not None and rename(k) in av_ours else None}
            for k, v in av_rel.items() if not v.is_floating_point()}
    out["averaging"] = {"float_tensors": a, "float_at": a_at, "missing": a_missing,
                        "integer_tensors": dict(list(ints.items())[:3]),
                        "integer_tensor_count": len(ints),
                        "integer_note": "ours keeps the newest checkpoint's counters, the "
                                        "released script divides them (floor of the mean)"}

    out["dtype"] = dtype
    checks = {
        "sites": not out["sites"]["differences_failing"],
        "forward_backward_float64": all(
            max(r["loss"], r["grads"], r["buffers"], r["sample_size"]) <= rtol
            and not r["grads_missing"] for r in fb64),
        "training": max(out["training"]["max"].values()) <= rtol and p <= rtol
                    and not p_missing,
        "resume": max(out["resume"]["max"].values()) <= rtol and rp <= rtol
                  and out["resume"]["eval_logits"] <= rtol
                  and ours["resume_num_updates"] == start,
        "averaging": a <= rtol and not a_missing,
    }
    if dtype == "float32":
        checks["forward_backward"] = all(
            max(r["loss"], r["grads"], r["buffers"], r["sample_size"]) <= rtol
            and not r["grads_missing"] for r in fb)
    out["checks"] = checks
    out["passed"] = all(checks.values())
    return out


def float32_context(root: Path, rtol: float) -> dict:
    """The float32 trajectories of an earlier ``--dtype float32`` run in ``root``, beside the
    LayerNorm control: per norm the maximum training deviations and their ratio to the control's
    (``ratio_to_layer``). Context, not a pass criterion: float32 rounding, amplified by Adam and
    ReLU, moves the control itself far beyond ``rtol`` over 50 updates."""
    norms = [n for n in PRESETS if (root / n / "train_ours.pt").is_file()]
    if "layer" not in norms:
        raise SystemExit(f"--float32-context {root}: no layer/train_ours.pt (the control)")
    out = {"work": str(root), "note": "float32 trajectories as context; ratio_to_layer = "
           "deviation / the LayerNorm control's, not a pass criterion"}
    runs = {n: compare(n, root / n, rtol, "float32") for n in norms}
    keys = ("loss", "nll_loss", "gnorm", "buffers")

    def row(r):
        t = r["training"]
        return {**{k: t["max"][k] for k in keys}, "lr": t["max"]["lr"],
                "final_params_and_buffers": t["final_params_and_buffers"],
                "final_at": t["final_at"],
                "fwd_bwd_grads": max(x["grads"] for x in r["forward_backward"])}

    control = row(runs["layer"])
    for n, r in runs.items():
        mine = row(r)
        ratios = {k: (mine[k] / control[k] if control[k] else None)
                  for k in ("loss", "gnorm", "final_params_and_buffers", "fwd_bwd_grads")}
        ran = json.loads((root / n / "spec_released.json").read_text())
        out[n] = {"max": mine, "ratio_to_layer": ratios,
                  "settings": {k: ran.get(k) for k in ("max_tokens", "updates", "warmup",
                                                       "dtype", "batches")}}
    return out


# ---------------------------------------------------------------------------------------- main

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

"""What each worker process runs: the released program's training (``released``), ours on the same
weights and batches (``ours``), the batches both read (``batches``), and the post-warmup
forward/backward of each (``released_post``, ``ours_post``)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from compare_released_parts.shims import (
    DTYPES,
    POST_WARMUP_ITERS,
    PRESETS,
    RELEASED_ARCH,
    REPO,
    SITE_ATTRS,
    _batches,
    _dump,
    _load,
    _norm_buffers,
    apply_float64_shims,
    apply_released_shims,
    legacy_integer_div,
)


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


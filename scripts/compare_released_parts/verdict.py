"""The comparisons: each record of ours against the released one, with the deviation allowed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from compare_released_parts.shims import PRESETS, _load


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


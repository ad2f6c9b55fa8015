"""Markdown tables from benchmark records (so the README's numbers are printed, not typed).

    python benchmarks/report.py results/benchmarks/norm_speed_omp1.json \\
        results/benchmarks/train_speed_multi30k.json results/benchmarks/train_speed_iwslt.json

A ``norm_speed`` record becomes one table of ratios to ``torch.nn.LayerNorm`` (norms by shape and
padding; CPU-time ratios for one thread, wall-clock ratios otherwise, see norm_speed.py); a
``train_speed`` record one table of words per second and ratios to LN per model size, a
``step_speed`` record one table of words per CPU second, ratios to LN and their intervals.
``--compare BEFORE AFTER`` prints two norm_speed records of the same shapes side by side
(``before -> after`` per cell), e.g. the records of one change measured at its parent commit and at
itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _head(title: str, cols: list[str]) -> list[str]:
    """A table's title line and its header over ``cols`` (the first column: the norm)."""
    return [title, "", "| norm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]


def norm_speed_table(record: dict) -> str:
    cols, table = _ratios(record)
    key = "ratio_to_layernorm" if record.get("threads") == 1 else "wall_ratio_to_layernorm"
    lines = _head(f"{record.get('threads')} thread(s), {'CPU' if 'wall' not in key else 'wall'} time "
                  f"ratio to torch.nn.LayerNorm; fused kernels: {record.get('fused_kernels', '?')}; "
                  f"commit {str(record.get('commit', '?'))[:12]}", cols)
    for norm, values in table.items():
        if norm == "torch.nn.LayerNorm":
            continue
        cells = " | ".join(f"{values[c]:.2f}" if c in values else "-" for c in cols)
        lines.append(f"| `{norm}` | {cells} |")
    base = table.get("torch.nn.LayerNorm", {})
    ln_ms = {r["shape"] + str(r["pad"]): r["cpu_ms"] for r in record["rows"]
             if r["norm"] == "torch.nn.LayerNorm"}
    if base and ln_ms:
        lines.append("| LayerNorm itself (ms, CPU) | " + " | ".join(
            f"{ms:.2f}" for ms in ln_ms.values()) + " |")
    return "\n".join(lines)


def _ratios(record: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    key = "ratio_to_layernorm" if record.get("threads") == 1 else "wall_ratio_to_layernorm"
    cols: list[str] = []
    table: dict[str, dict[str, float]] = {}
    for row in record["rows"]:
        col = f"{row['shape']}, pad {round(row['pad'] * 100)}%"
        if col not in cols:
            cols.append(col)
        table.setdefault(row["norm"], {})[col] = row[key]
    return cols, table


def compare_table(before: dict, after: dict) -> str:
    """``before -> after`` ratios to torch.nn.LayerNorm, per norm and shape, for two records."""
    cols, old = _ratios(before)
    _, new = _ratios(after)
    lines = _head(f"ratio to torch.nn.LayerNorm, commit {str(before.get('commit', '?'))[:12]} -> "
                  f"{str(after.get('commit', '?'))[:12]}; fused kernels: {before.get('fused_kernels', '?')} -> "
                  f"{after.get('fused_kernels', '?')}", cols)
    for norm in list(old) + [n for n in new if n not in old]:
        if norm == "torch.nn.LayerNorm":
            continue

        def cell(c, norm=norm):
            a, b = old.get(norm, {}).get(c), new.get(norm, {}).get(c)
            return " -> ".join("-" if v is None else f"{v:.2f}" for v in (a, b))
        lines.append(f"| `{norm}` | " + " | ".join(cell(c) for c in cols) + " |")
    return "\n".join(lines)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: no such benchmark record")
    return json.loads(path.read_text())


def train_speed_table(record: dict) -> str:
    lines = ["| model size | norm | words/s (wall) | x LN | words per CPU second | x LN |",
             "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        norms = [k[len("wps_"):] for k in row if k.startswith("wps_") and "ratio" not in k]
        for norm in norms:
            wps, cpu = row[f"wps_{norm}"], row[f"cpu_wps_{norm}"]
            lines.append(f"| {row['size']} ({row['arch']}) | {norm} | {wps:.0f} | "
                         f"{wps / row['wps_LN']:.3f} | {cpu:.0f} | {cpu / row['cpu_wps_LN']:.3f} |")
    lines.append("")
    lines.append(f"commit {str(record.get('commit', '?'))[:12]}; load average before/after "
                 f"{record.get('loadavg_before_after')}")
    return "\n".join(lines)


def step_speed_table(record: dict) -> str:
    """Words per CPU second and their ratio to LN; words per wall-clock second beside them where
    the record has them (the ratio to read with more than one thread)."""
    wall = "wall_wps_LN" in record["rows"][0]
    lines = ["| model size | norm | words per CPU second | x LN | 95% interval over rounds |"
             + (" words per wall second | x LN | 95% interval |" if wall else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if wall else "")]
    for row in record["rows"]:
        for norm in [k[len("cpu_wps_"):] for k in row if k.startswith("cpu_wps_")]:
            sites = "" if row.get("sites", ["encoder", "decoder"]) == ["encoder", "decoder"] else \
                f", {'+'.join(row['sites'])} only"
            line = f"| {row['size']} ({row['arch']}{sites}) | {norm} |"
            for wps, ratio in (("cpu_wps", "ratio"), ("wall_wps", "wall_ratio"))[:1 + wall]:
                value, ci = row[f"{wps}_{norm}"], row.get(f"{ratio}_ci95_{norm}")
                line += (f" {value:.0f} | {value / row[f'{wps}_LN']:.3f} | "
                         + (f"{ci[0]:.3f}-{ci[1]:.3f} |" if ci else "- |"))
            lines.append(line)
    lines.append("")
    lines.append(f"commit {str(record.get('commit', '?'))[:12]}; {record['rows'][0]['steps']} rounds; "
                 f"{record.get('threads', '?')} thread(s); "
                 f"load average before/after {record.get('loadavg_before_after')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="*", type=Path, metavar="RECORD",
                   help="JSON records written by benchmarks/norm_speed.py, train_speed.py or step_speed.py")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="two norm_speed records: one table of 'before -> after' ratios")
    args = p.parse_args(argv)
    if not args.records and not args.compare:
        p.error("give RECORD files, or --compare BEFORE AFTER")
    if args.compare:
        before, after = map(_load, args.compare)
        print(f"### {args.compare[0]} -> {args.compare[1]}\n\n{compare_table(before, after)}\n")
    for path in args.records:
        record = _load(path)
        print(f"### {path}\n")
        if record.get("benchmark") == "train_speed":
            print(train_speed_table(record))
        elif record.get("benchmark") == "step_speed":
            print(step_speed_table(record))
        elif "rows" in record and record["rows"] and "ratio_to_layernorm" in record["rows"][0]:
            print(norm_speed_table(record))
        else:
            raise SystemExit(f"{path}: not a norm_speed, train_speed or step_speed record")
        print()


if __name__ == "__main__":
    main()

"""Markdown tables from benchmark records (so the README's numbers are printed, not typed).

    python benchmarks/report.py results/benchmarks/norm_speed_omp1.json \\
        results/benchmarks/train_speed_multi30k.json results/benchmarks/train_speed_iwslt.json

A ``norm_speed`` record becomes one table of ratios to ``torch.nn.LayerNorm`` (norms by shape and
padding; CPU-time ratios for one thread, wall-clock ratios otherwise, see norm_speed.py); a
``train_speed`` record one table of words per second and ratios to LN per model size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def norm_speed_table(record: dict) -> str:
    key = "ratio_to_layernorm" if record.get("threads") == 1 else "wall_ratio_to_layernorm"
    cols: list[str] = []
    table: dict[str, dict[str, float]] = {}
    for row in record["rows"]:
        col = f"{row['shape']}, pad {round(row['pad'] * 100)}%"
        if col not in cols:
            cols.append(col)
        table.setdefault(row["norm"], {})[col] = row[key]
    lines = [f"{record.get('threads')} thread(s), {'CPU' if 'wall' not in key else 'wall'} time "
             f"ratio to torch.nn.LayerNorm; fused kernels: {record.get('fused_kernels', '?')}; "
             f"commit {str(record.get('commit', '?'))[:12]}",
             "",
             "| norm | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", type=Path, metavar="RECORD",
                   help="JSON records written by benchmarks/norm_speed.py or train_speed.py")
    for path in p.parse_args(argv).records:
        if not path.is_file():
            raise SystemExit(f"{path}: no such benchmark record")
        record = json.loads(path.read_text())
        print(f"### {path}\n")
        if record.get("benchmark") == "train_speed":
            print(train_speed_table(record))
        elif "rows" in record and record["rows"] and "ratio_to_layernorm" in record["rows"][0]:
            print(norm_speed_table(record))
        else:
            raise SystemExit(f"{path}: not a norm_speed or train_speed record")
        print()


if __name__ == "__main__":
    main()

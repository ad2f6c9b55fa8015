#!/usr/bin/env python
"""Normalized singular values of checkpoints' word-embedding matrices (the paper's Fig. 6).

    python analysis/embedding_spectrum.py ln/checkpoint_best.pt pn/checkpoint_best.pt \\
        --labels LN PN --out results/fig6_spectrum.png

Reads ``encoder.embed_tokens.weight`` (else ``decoder.embed_tokens.weight``; ``--key`` to choose)
of each checkpoint, divides its singular values by the largest, plots them on one figure and
writes the spectra beside the image as ``<out>.json`` and ``<out>.csv`` (one column per model).
"""

from __future__ import annotations

import argparse
import csv
import io
import os

from powernorm_fairseq.analysis.plots import plot_spectra
from powernorm_fairseq.analysis.spectrum import load_embedding, normalized_spectrum
from powernorm_fairseq.pipeline.common import atomic_write_json, atomic_write_text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="fairseq checkpoints (.pt)")
    p.add_argument("--out", required=True, help="output image (.png, .pdf, ...)")
    p.add_argument("--labels", nargs="+", help="curve labels (default: the checkpoint paths)")
    p.add_argument("--key", help="state-dict key of the embedding matrix")
    p.add_argument("--logy", action="store_true", help="log-scale y axis")
    p.add_argument("--title")
    args = p.parse_args(argv)
    labels = args.labels or args.checkpoints
    if len(labels) != len(args.checkpoints):
        p.error(f"--labels needs one label per checkpoint ({len(args.checkpoints)}), got {len(labels)}")
    if len(set(labels)) != len(labels):
        p.error(f"labels must be distinct, got {labels}")
    spectra, records = {}, []
    for label, path in zip(labels, args.checkpoints, strict=True):
        try:
            weight, key = load_embedding(path, args.key)
            values = normalized_spectrum(weight).tolist()
        except (OSError, ValueError) as e:
            raise SystemExit(f"embedding_spectrum: {e}") from e
        spectra[label] = values
        records.append({"label": label, "checkpoint": os.path.abspath(path), "key": key,
                        "shape": list(weight.shape), "normalized_singular_values": values})
    plot_spectra(spectra, args.out, logy=args.logy, title=args.title)
    stem = os.path.splitext(args.out)[0]
    atomic_write_json(stem + ".json", records)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", *labels])
    for k in range(max(len(v) for v in spectra.values())):
        writer.writerow([k + 1, *(f"{v[k]:.6g}" if k < len(v) else "" for v in spectra.values())])
    atomic_write_text(stem + ".csv", buf.getvalue())
    print(f"wrote {args.out}, {stem}.json, {stem}.csv")


if __name__ == "__main__":
    main()

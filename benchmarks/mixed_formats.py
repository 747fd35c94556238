"""Formats per layer under a latency or accuracy budget, on a trained Flowers-102 model: the rows of notebook 04's choice.

    python -m vitlab run params/flowers_mixed.yaml --set model.id=RUN/finetune/model --set data.root=DIR \
        --time-limit 9m                                   # then --resume MIXED_RUN --time-limit 9m until it exits 0
    python benchmarks/run.py mixed_formats MIXED_RUN --model vit_s16    # -> results/mixed_formats_<device>.json

Turns the ablation step's mixed choice (ablation/mixed_formats.json of a `vitlab run` of
params/flowers_mixed.yaml) into flat rows: every configuration checked on test, at every batch size,
with its formats per layer, p50 latency and top-1 with the paired difference against 16-bit; the
candidates measured on valid follow as `table: candidate`.
"""
from __future__ import annotations

import time
from pathlib import Path

from common import parser, write

from vitlab import runs


def collect(run: Path, model: str) -> list[dict]:
    study = runs.read_json(runs.path(run, "mixed_formats"))
    if not study["checks"]:
        raise SystemExit(f"{run} made no mixed choice (ablation.formats was empty)")
    keep = ("choice", "formats", "batch_size", "p50_ms", "top1", "top1_lo", "top1_hi", "top1_delta_pt", "delta_lo_pt",
            "delta_hi_pt", "vs_choice_pt", "vs_choice_lo_pt", "vs_choice_hi_pt", "kl", "n")
    rows = [{"model": model, "split": study["verify_split"], **{k: r[k] for k in keep}} for r in study["checks"]]
    rows += [{"model": model, "split": runs.load_params(run)["ablation"]["split"], "table": "candidate",
              **{k: r[k] for k in keep if k in r}} for r in study["candidates"]]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("run", type=Path, help="a run of params/flowers_mixed.yaml (its ablation step finished)")
    ap.add_argument("--model", default="vit_s16", help="the model's name in the rows")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = collect(args.run, args.model)
    path = write(args, "mixed_formats", t0, rows, weights=f"trained: {args.run.name}",
                 measured_on=runs.manifest(args.run)["device"], run=args.run.name)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

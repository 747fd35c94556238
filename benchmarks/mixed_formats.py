"""Formats per layer under a latency or accuracy budget, on a trained Flowers-102 model: the rows of notebook 04's choice.

    python -m vitlab run params/flowers_mixed.yaml --set model.id=RUN/finetune/model --set data.root=DIR \
        --time-limit 9m                                   # then --resume MIXED_RUN --time-limit 9m until it exits 0
    python benchmarks/run.py mixed_formats MIXED_RUN --model vit_s16    # -> results/mixed_formats_<device>.json
    python benchmarks/run.py mixed_formats MIXED_RUN --model vit_l16 --into results/mixed_formats_<device>.json

Turns the ablation step's mixed choice (ablation/mixed_formats.json of a `vitlab run` of
params/flowers_mixed.yaml) into flat rows: every configuration checked on test, at every batch size,
with its formats per layer, p50 latency and top-1 with the paired difference against 16-bit; the
candidates measured on valid follow as `table: candidate`. --into adds the model to a file of other models'
studies (a model collected again replaces its own rows); `meta.runs` names each model's run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from common import parser, result_path, write

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
    ap.add_argument("--into", type=Path, help="a result file of other models' studies to add this model to")
    args = ap.parse_args(argv)
    t0, device = time.time(), runs.manifest(args.run)["device"]
    rows, studied = collect(args.run, args.model), {args.model: args.run.name}
    if args.into:  # written where write() puts it: refuse a file of another name rather than leave it stale
        if not args.into.is_file():
            raise SystemExit(f"--into {args.into}: no such result file (collect a first model without --into)")
        if args.into.resolve() != (written := result_path(args, "mixed_formats", device)).resolve():
            raise SystemExit(f"--into {args.into}: this collect writes {written} (--out, --tag)")
        earlier = json.loads(args.into.read_text())
        rows = [r for r in earlier["rows"] if r["model"] != args.model] + rows
        studied = earlier["meta"].get("runs", {}) | studied
    path = write(args, "mixed_formats", t0, rows, weights="trained: " + ", ".join(f"{m} {r}" for m, r in studied.items()),
                 measured_on=device, runs=studied)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

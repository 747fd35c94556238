"""vitlab's FP8 GEMM (lib/vitlab/kernels.py) against cuBLAS, one ViT-L/16 linear at a time, on one GPU.

    python benchmarks/fp8_kernels.py --out DIR     # -> DIR/fp8_kernels.json and a table

For each layer shape of ViT-L/16 (qkv, attention output, fc1, fc2) at the rows of batch 256, 32 and 1
(x 197 tokens): the kernel with FP8 and with packed int4 weights, over a sweep of tile configurations,
against torch._scaled_mm (cuBLAS) on the same FP8 operands; for fc1, cuBLAS is followed by the GELU
and FP8 cast the kernel does in its epilogue (one compiled pointwise kernel, as the compiled model
runs it). Every configuration is first checked against a float32 reference on the same operands.
Medians of CUDA-event timings (triton.testing.do_bench), TFLOP/s and % of the dense FP8 peak.
Each call is launched from Python, so below ~10 us of GPU work (6,304 and 197 rows) the times are the
launch's, not the kernel's: for those, read the per-kernel tables of the CUDA-graphed models in
benchmarks/results/peers_h100.json (H100 run of 2026-11-24: 50,432 rows is the trustworthy part).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import triton.testing
from common import write

from vitlab import kernels, speed

FP8 = torch.float8_e4m3fn
LAYERS = {"qkv": (3072, 1024), "o_proj": (1024, 1024), "fc1": (4096, 1024), "fc2": (1024, 4096)}
LARGE = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 64, 4, 4), (128, 64, 128, 4, 4),
         (64, 128, 128, 4, 4)]
SMALL = [(64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 128, 4, 3), (32, 32, 128, 4, 4),
         (16, 64, 128, 4, 4), (64, 64, 64, 4, 5)]
FP8_PEAK = 1978.9  # H100 SXM dense FP8 TFLOP/s


def operands(m: int, n: int, k: int, device: torch.device):
    """FP8 rows and one real-valued linear as vitlab's FP8 and int4 (W4A8) layers, with the float32
    weights each stands for."""
    x = torch.randn(m, k, device=device)
    linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    amax = float(x.abs().amax())
    layers = {"fp8": speed.Fp8Linear(linear, amax), "int4": speed.Int4Linear(linear, "fp8", amax)}
    return {"xq": layers["fp8"].quantize(x), "layers": layers,
            "weights_f32": {kind: layer.fp8_weight().float() * layer.weight_scale.t() for kind, layer in layers.items()}}


def reference(ops, weight_kind: str, gelu: bool, out_scale):
    layer = ops["layers"][weight_kind]
    y = (ops["xq"].float() * layer.input_scale) @ ops["weights_f32"][weight_kind].t() + layer.bias.float()
    y = F.gelu(y) if gelu else y
    return y if out_scale is None else (y / out_scale).clamp(-448, 448).to(FP8).float() * out_scale


def cublas(ops, weight_kind: str, gelu: bool, out_scale):
    """The layer's cuBLAS path (int4 weights expanded to FP8 first), then fc1's GELU + cast as compiled."""
    y = ops["layers"][weight_kind].cublas(ops["xq"])
    return _gelu_cast(y, out_scale) if gelu else y


@torch.compile(dynamic=False)
def _gelu_cast(y, out_scale):
    return (F.gelu(y.float()) / out_scale).clamp(-448, 448).to(FP8)


def ours(ops, weight_kind: str, gelu: bool, out_scale, config):
    """vitlab's kernel at one tile configuration, reading the int4 codes themselves at any row count."""
    layer = ops["layers"][weight_kind]
    weight, exponent = (layer.packed, layer.exponent) if weight_kind == "int4" else (layer.weight, None)
    out = torch.empty(ops["xq"].shape[0], weight.shape[0], device=weight.device, dtype=FP8 if out_scale is not None else torch.bfloat16)
    kernels.launch(ops["xq"], weight, exponent, layer.input_scale, layer.weight_scale.reshape(-1), layer.bias, out_scale,
                   gelu, out, config)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="50432,6304,197")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    device, t0, rows = torch.device("cuda"), time.time(), []
    torch.manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        for layer, (n, k) in LAYERS.items():
            ops = operands(m, n, k, device)
            gelu = layer == "fc1"
            out_scale = torch.tensor(0.02, device=device) if gelu else None
            flops = 2 * m * n * k
            for weight_kind in ("fp8", "int4"):
                ref = reference(ops, weight_kind, gelu, out_scale)
                base = {"rows": m, "layer": layer, "n": n, "k": k, "weights": weight_kind}
                ms = triton.testing.do_bench(lambda: cublas(ops, weight_kind, gelu, out_scale), return_mode="median")
                rows.append({**base, "impl": "cublas" + (" + gelu/cast kernel" if gelu else "")
                             + (" + dequant" if weight_kind == "int4" else ""), "config": None, "ms": ms,
                             "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                for config in (SMALL if m <= 8192 else []) + (LARGE if m > 1024 else []):
                    try:
                        got = ours(ops, weight_kind, gelu, out_scale, config).float()
                        got = got * out_scale if out_scale is not None else got
                        err = ((got - ref).norm() / ref.norm()).item()
                        ms = triton.testing.do_bench(lambda: ours(ops, weight_kind, gelu, out_scale, config), return_mode="median")
                    except Exception as e:  # a tile that does not fit in shared memory
                        rows.append({**base, "impl": "vitlab", "config": str(config), "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    rows.append({**base, "impl": "vitlab", "config": str(config), "rel_err": err, "ms": ms,
                                 "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                best = min((r for r in rows if r.get("impl") == "vitlab" and "ms" in r and r["rows"] == m
                            and r["layer"] == layer and r["weights"] == weight_kind), key=lambda r: r["ms"])
                cub = next(r for r in rows if r["impl"].startswith("cublas") and r["rows"] == m and r["layer"] == layer
                           and r["weights"] == weight_kind)
                print(f"{m:6d} {layer:7s} {weight_kind}: cublas {cub['ms']*1e3:8.1f} us | vitlab best {best['ms']*1e3:8.1f} us "
                      f"{best['config']} ({best['tflops']:.0f} TFLOP/s, err {best['rel_err']:.1e})", flush=True)
            write(Path(args.out), "fp8_kernels", args, t0, rows=rows)
    table = pd.DataFrame([r for r in rows if "ms" in r])
    print(table.groupby(["rows", "layer", "weights", "impl"])["ms"].min().unstack("impl").mul(1e3).round(1).to_string())


if __name__ == "__main__":
    main()

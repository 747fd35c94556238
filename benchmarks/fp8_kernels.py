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
    """FP8 rows and a real-valued weight in both formats, with the float32 matrices they stand for."""
    x = torch.randn(m, k, device=device)
    x_scale = x.abs().amax() / 448
    xq = (x / x_scale).to(FP8)
    linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    fp8 = speed.Fp8Linear(linear, 1.0)
    packed, exponent, row_scale = speed.int4_quantize(linear.weight)
    return {"xq": xq, "x_scale": x_scale.float(), "bias": linear.bias.detach(),
            "fp8": (fp8.weight, None, fp8.weight_scale.reshape(-1).contiguous(), fp8.weight.float() * fp8.weight_scale.t()),
            "int4": (packed, exponent, row_scale.contiguous(),
                     speed.int4_dequantize(packed, exponent) * row_scale[:, None])}


def reference(ops, weight_f32, gelu: bool, out_scale):
    y = (ops["xq"].float() * ops["x_scale"]) @ weight_f32.t() + ops["bias"].float()
    y = F.gelu(y) if gelu else y
    return y if out_scale is None else (y / out_scale).clamp(-448, 448).to(FP8).float() * out_scale


def cublas(ops, weight_kind: str, gelu: bool, out_scale):
    weight, exponent, w_scale, _ = ops[weight_kind]
    w8 = weight if weight_kind == "fp8" else (speed.int4_dequantize(weight, exponent)).to(FP8)
    m = ops["xq"].shape[0]
    y = torch._scaled_mm(ops["xq"], w8.t(), scale_a=ops["x_scale"].expand(m, 1).contiguous(), scale_b=w_scale[None, :],
                         bias=ops["bias"], out_dtype=torch.bfloat16, use_fast_accum=True)
    if gelu:
        y = _gelu_cast(y, out_scale)
    return y


@torch.compile(dynamic=False)
def _gelu_cast(y, out_scale):
    return (F.gelu(y.float()) / out_scale).clamp(-448, 448).to(FP8)


def ours(ops, weight_kind: str, gelu: bool, out_scale, config):
    weight, exponent, w_scale, _ = ops[weight_kind]
    out = torch.empty(ops["xq"].shape[0], weight.shape[0], device=weight.device, dtype=FP8 if out_scale is not None else torch.bfloat16)
    kernels.launch(ops["xq"], weight, exponent, ops["x_scale"], w_scale, ops["bias"], out_scale, gelu, out, config)
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
                ref = reference(ops, ops[weight_kind][3], gelu, out_scale)
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

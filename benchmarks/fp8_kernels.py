"""vitlab's FP8 GEMM (lib/vitlab/kernels.py) against cuBLAS, one ViT-L/16 linear at a time, on one GPU.

    python benchmarks/fp8_kernels.py --out DIR     # -> DIR/fp8_kernels.json and a table

For each layer shape of ViT-L/16 (qkv, attention output, fc1, fc2) at the rows of batch 256, 32 and 1
(x 197 tokens): the kernel with FP8 and with packed int4 weights, over a sweep of tile configurations
(one tile per thread block, or persistent: one block per multiprocessor walking the tiles), against
torch._scaled_mm (cuBLAS) on the same FP8 operands; for fc1, cuBLAS is followed by the GELU and FP8
cast the kernel does in its epilogue (one compiled pointwise kernel, as the compiled model runs it).
Every configuration is first checked against a float32 reference on the same operands. Each call is
timed inside a CUDA graph of repeated calls (triton.testing.do_bench_cudagraph, medians), as the
graphed model launches it, so one image's ~5 us kernels are not timed as Python's launch overhead;
the calls take turns over copies of the layer twice the L2 cache in size, so each reads its weights
from memory as a model's next layer does, and a split K is timed with the kernel that adds up its
partial sums (in the model that sum fuses into the next kernel, for about the same cost).
TFLOP/s and % of the dense FP8 peak. At batch 256 and 32 only fc1 runs on vitlab's kernel in the model
(cuBLAS's main loop is faster on the others), so by default only fc1 is swept there.

With --quack (the `quack-kernels` package: CuTe-DSL GEMMs on CUTLASS's Python DSL), its Hopper GEMM runs
on the same FP8 operands, with fc1's exact GELU in its epilogue, its bf16 output cast to FP8 by the same
compiled kernel as cuBLAS's. quack's epilogue scales by one number (alpha), not per output channel as
vitlab's FP8 weights are, so its rows time the main loop and epilogue with the weight scale's mean: a
speed to compare, not a layer to use as is (rel_err says how far off it is).
"""
from __future__ import annotations

import itertools
import math
import time

import pandas as pd
import torch
import torch.nn.functional as F
import triton.testing
from common import parser, write

from vitlab import kernels, lowbit

FP8 = torch.float8_e4m3fn
LAYERS = {"qkv": (3072, 1024), "o_proj": (1024, 1024), "fc1": (4096, 1024), "fc2": (1024, 4096)}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent, splits of K); int4 weights need BLOCK_K = 128
LARGE = [(128, 256, 128, 8, 3, False, 1), (128, 256, 128, 8, 3, True, 1), (256, 128, 128, 8, 3, False, 1),
         (256, 128, 128, 8, 4, False, 1), (256, 128, 128, 8, 2, False, 1), (256, 128, 64, 8, 4, False, 1),
         (128, 256, 128, 8, 4, False, 1), (128, 256, 128, 8, 2, False, 1), (128, 128, 128, 4, 3, False, 1),
         (128, 128, 128, 4, 2, False, 1), (128, 128, 64, 4, 4, False, 1), (256, 128, 128, 8, 3, True, 1)]
SMALL_TILES = [(64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 4), (64, 32, 128, 4, 4),
               (64, 64, 256, 4, 3), (16, 64, 128, 4, 4), (128, 32, 128, 4, 4)]
SMALL = [(*tile, False, splits) for tile in SMALL_TILES for splits in (1, 2, 4, 8)]
FP8_PEAK = 1978.9  # dense FP8 TFLOP/s of the H100 SXM and the H200 (the same tensor cores)


def operands(m: int, n: int, k: int, device: torch.device):
    """FP8 rows and real-valued linears as vitlab's FP8 and int4 (W4A8) layers (as many copies as fill
    twice the L2 cache at 4 bits), with the float32 weights the first copy stands for."""
    x = torch.randn(m, k, device=device)
    amax = float(x.abs().amax())
    copies = max(2, math.ceil(2 * torch.cuda.get_device_properties(device).L2_cache_size / (n * k / 2)))
    layers = {"fp8": [], "int4": []}
    for _ in range(copies):
        linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        layers["fp8"].append(lowbit.Fp8Linear(linear, amax))
        layers["int4"].append(lowbit.Int4Linear(linear, "fp8", amax))
    return {"xq": layers["fp8"][0].quantize(x), "layers": layers,
            "weights_f32": {kind: copy[0].fp8_weight().float() * copy[0].weight_scale.t() for kind, copy in layers.items()}}


def reference(ops, weight_kind: str, gelu: bool, out_scale):
    layer = ops["layers"][weight_kind][0]
    y = (ops["xq"].float() * layer.input_scale) @ ops["weights_f32"][weight_kind].t() + layer.bias.float()
    y = F.gelu(y) if gelu else y
    return y if out_scale is None else (y / out_scale).clamp(-448, 448).to(FP8).float() * out_scale


def cublas(ops, weight_kind: str, gelu: bool, out_scale, copy: int = 0):
    """The layer's cuBLAS path (int4 weights expanded to FP8 first), then fc1's GELU + cast as compiled."""
    y = ops["layers"][weight_kind][copy].cublas(ops["xq"])
    return _gelu_cast(y, out_scale) if gelu else y


@torch.compile(dynamic=False)
def _gelu_cast(y, out_scale):
    return (F.gelu(y.float()) / out_scale).clamp(-448, 448).to(FP8)


_add_partials = torch.compile(kernels.add_partials, dynamic=False)


def ours(ops, weight_kind: str, gelu: bool, out_scale, config, copy: int = 0):
    """vitlab's kernel at one tile configuration, reading the int4 codes themselves at any row count;
    a split K's partial sums added up with the bias."""
    layer = ops["layers"][weight_kind][copy]
    weight, exponent = (layer.packed, layer.exponent) if weight_kind == "int4" else (layer.weight, None)
    out = kernels.launch(ops["xq"], weight, exponent, layer.input_scale, layer.weight_scale.reshape(-1), layer.bias,
                         out_scale, gelu, torch.bfloat16, config)
    return _add_partials(out, layer.bias, torch.bfloat16) if out.dim() == 3 else out


def quack(ops, gelu: bool, out_scale, copy: int = 0):
    """quack's gemm / gemm_act on the FP8 layer's operands, alpha = input scale x the mean weight scale."""
    from quack.gemm_interface import gemm, gemm_act

    layer = ops["layers"]["fp8"][copy]
    alpha = float(layer.input_scale) * float(layer.weight_scale.float().mean())
    b = layer.fp8_weight().t()  # (k, n), k-major: what quack's FP8 GEMM reads
    if not gelu:
        return gemm(ops["xq"], b, bias=layer.bias, alpha=alpha, out_dtype=torch.bfloat16)
    _, y = gemm_act(ops["xq"], b, bias=layer.bias, activation="gelu_erf", alpha=alpha, out_dtype=torch.bfloat16,
                    postact_dtype=torch.bfloat16, store_preact=False)
    return _cast(y, out_scale)


@torch.compile(dynamic=False)
def _cast(y, out_scale):
    return (y.float() / out_scale).clamp(-448, 448).to(FP8)


def taking_turns(ops, fn):
    """`fn(copy)` over the layer's copies in turn, one per call."""
    calls, copies = itertools.count(), len(ops["layers"]["fp8"])
    return lambda: fn(next(calls) % copies)


def timed(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", default="50432,6304,197", help="GEMM rows: batch 256, 32 and 1 x 197 tokens")
    ap.add_argument("--large-layers", default="fc1", help="layers swept above kernels.SMALL_M rows")
    ap.add_argument("--quack", action="store_true", help="also time quack-kernels' GEMM (FP8 weights only)")
    args = ap.parse_args(argv)
    device, t0, rows = torch.device(args.device), time.time(), []
    torch.manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        layers = LAYERS if m <= kernels.SMALL_M else {name: LAYERS[name] for name in args.large_layers.split(",")}
        for layer, (n, k) in layers.items():
            ops = operands(m, n, k, device)
            gelu = layer == "fc1"
            out_scale = torch.tensor(0.02, device=device) if gelu else None
            flops = 2 * m * n * k
            for weight_kind in ("fp8", "int4"):
                ref = reference(ops, weight_kind, gelu, out_scale)
                base = {"rows": m, "layer": layer, "n": n, "k": k, "weights": weight_kind}
                ms = timed(taking_turns(ops, lambda i: cublas(ops, weight_kind, gelu, out_scale, i)))
                rows.append({**base, "impl": "cublas" + (" + gelu/cast kernel" if gelu else "")
                             + (" + dequant" if weight_kind == "int4" else ""), "config": None, "ms": ms,
                             "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                if args.quack and weight_kind == "fp8":
                    impl = "quack" + (" gemm_act(gelu_erf) + cast kernel" if gelu else " gemm")
                    try:
                        got = quack(ops, gelu, out_scale).float()
                        got = got * out_scale if gelu else got
                        ms = timed(taking_turns(ops, lambda i: quack(ops, gelu, out_scale, i)))
                    except Exception as e:  # a library that does not run here is a row that says why, not a lost sweep
                        rows.append({**base, "impl": impl, "config": "tuned", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                        print(f"{m:6d} {layer:7s} quack: {rows[-1]['error']}", flush=True)
                    else:
                        rows.append({**base, "impl": impl, "config": "tuned", "rel_err": ((got - ref).norm() / ref.norm()).item(),
                                     "ms": ms, "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                measured = {}
                for config in SMALL if m <= kernels.SMALL_M else LARGE:
                    if (weight_kind == "int4" and config[2] != kernels.INT4_GROUP) or (config[-1] > 1 and (
                            gelu or k % (config[2] * config[-1]))):
                        continue
                    try:
                        got = ours(ops, weight_kind, gelu, out_scale, config).float()
                        got = got * out_scale if out_scale is not None else got
                        err = ((got - ref).norm() / ref.norm()).item()
                        call = taking_turns(ops, lambda i: ours(ops, weight_kind, gelu, out_scale, config, i))
                        ms = measured[config] = timed(call)
                    except Exception as e:  # a tile that does not fit in shared memory
                        rows.append({**base, "impl": "vitlab", "config": str(config),
                                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    rows.append({**base, "impl": "vitlab", "config": str(config), "rel_err": err, "ms": ms,
                                 "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                cub = next(r for r in rows if r["impl"].startswith("cublas") and (r["rows"], r["layer"], r["weights"])
                           == (m, layer, weight_kind))
                if gelu and m > kernels.SMALL_M:  # what the epilogue costs: the best tiles without GELU, then without the cast
                    best = min(measured, key=measured.get)
                    for probe, (g, o) in {"no GELU": (False, out_scale), "no GELU, bf16 out": (False, None)}.items():
                        ms = timed(taking_turns(ops, lambda i: ours(ops, weight_kind, g, o, best, i)))
                        rows.append({**base, "impl": f"vitlab probe: {probe}", "config": str(best), "ms": ms,
                                     "tflops": flops / ms / 1e9, "pct_fp8_peak": 100 * flops / ms / 1e9 / FP8_PEAK})
                line = f"{m:6d} {layer:7s} {weight_kind}: cublas {cub['ms']*1e3:8.1f} us"
                for config in sorted(measured, key=measured.get)[:3]:
                    line += f" | {config} {measured[config]*1e3:.1f} us {flops / measured[config] / 1e9:.0f} TFLOP/s"
                for r in rows[len(rows) - 2:] if gelu and m > kernels.SMALL_M else []:
                    line += f" | {r['impl'][7:]} {r['ms']*1e3:.1f} us"
                print(line, flush=True)
            write(args, "fp8_kernels", t0, rows)
    table = pd.DataFrame([r for r in rows if "ms" in r])
    print(table.groupby(["rows", "layer", "weights", "impl"])["ms"].min().unstack("impl").mul(1e3).round(1).to_string())


if __name__ == "__main__":
    main()

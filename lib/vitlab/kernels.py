"""vitlab's own Triton GEMM for FP8 activations: `fp8_linear`, weights in e4m3 or packed int4.

Why a kernel of our own (measured on the H100, ViT-L/16, batch 256, benchmarks/results/peers_h100.json):
cuBLAS's FP8 GEMM cannot apply GELU nor cast its output to FP8, so after fc1 a separate kernel read
the 16-bit activations back and wrote them as FP8 (10 ms of a 51 ms forward); here both happen in the
GEMM's epilogue. At batch 1 (197 rows) cuBLAS offers FP8 only in 128x128 tiles, 16 thread blocks for
a 1024-wide layer on 132 multiprocessors; here the tiles follow the shape. With int4 weights the
kernel reads half a byte per weight and expands it to FP8 in registers, 128 inputs (one exponent
group) at a time: every code q times 2**-e is exact in e4m3 (speed.int4_quantize), so the tensor
cores multiply the 4-bit weights themselves. (Measured: the expansion in registers costs more than
it saves at batch 1, 1.93 ms against 1.15 with FP8 weights; see the README's speed section.)

    y = epilogue(x_scale * w_scale[n] * sum_k x[m, k] * w[n, k] + bias[n])
    epilogue: identity or GELU (erf), then the output type, or an FP8 cast with a static scale.

On a CPU the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1 set before triton is first
imported, as the tests do; slow, for checking numerics).
"""
from __future__ import annotations

import importlib.util
import os

import torch

FP8 = torch.float8_e4m3fn
INT4_GROUP = 128  # inputs per power-of-two exponent (speed.int4_quantize); a K block never spans two

AVAILABLE = importlib.util.find_spec("triton") is not None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by rows: many rows fill the GPU with large tiles
# (the fastest fc1 + GELU + FP8 cast at batch 256 in benchmarks/fp8_kernels.py); few rows (one image
# is 197) need small tiles for enough thread blocks.
CONFIGS = {"large": (128, 256, 128, 8, 3), "small": (64, 64, 128, 4, 4)}
SMALL_M = 1024  # up to this many rows vitlab's kernel beats cuBLAS's FP8 GEMM on every ViT-L/16 linear (H100)


def config_for(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    return CONFIGS["small" if m <= SMALL_M else "large"]


if AVAILABLE:
    import triton
    import triton.language as tl

    def _linear_kernel(x_ptr, w_ptr, e_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                       M, N, K, stride_xm, stride_wn, stride_en, stride_om,
                       INT4: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FP8_OUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Thread blocks walk the output in groups of GROUP_M row tiles, so neighbours share weight tiles in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
        in_group = GROUP_M * tiles_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if INT4:
            # Bytes (BLOCK_K / 2, BLOCK_N), byte j holding inputs 2j (low nibble) and 2j + 1, expanded and
            # interleaved back into a (BLOCK_K, BLOCK_N) FP8 tile; BLOCK_K is one exponent group. (Two
            # 64-input dots on halves packed j | j + 64 instead ran batch 1 at 2.27 ms rather than 1.93.)
            x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
            w_ptrs = w_ptr + rn[None, :] * stride_wn + tl.arange(0, BLOCK_K // 2)[:, None]
            for k in range(0, K, BLOCK_K):
                packed = tl.load(w_ptrs, mask=n_ok[None, :], other=0x88)
                step = tl.exp2(-tl.load(e_ptr + rn * stride_en + k // BLOCK_K, mask=n_ok, other=0).to(tl.float32))[None, :]
                low = ((packed & 15).to(tl.float32) - 8.0) * step
                high = ((packed >> 4).to(tl.float32) - 8.0) * step
                b = tl.join(low, high).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N).to(tl.float8e4nv)
                acc = tl.dot(tl.load(x_ptrs, mask=m_ok[:, None], other=0.0), b, acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K // 2
        else:
            # The weight is (N, K) row-major: a (BLOCK_K, BLOCK_N) tile of its transpose.
            x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
            w_ptrs = w_ptr + rn[None, :] * stride_wn + tl.arange(0, BLOCK_K)[:, None]
            for k in range(0, K, BLOCK_K):
                acc = tl.dot(tl.load(x_ptrs, mask=m_ok[:, None], other=0.0), tl.load(w_ptrs, mask=n_ok[None, :], other=0.0), acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K

        y = acc * (tl.load(x_scale_ptr) * tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0))[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as transformers' "gelu"
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if FP8_OUT:
            y = tl.clamp(y / tl.load(out_scale_ptr), -448.0, 448.0).to(tl.float8e4nv)
        else:
            y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    _kernel = triton.jit(_linear_kernel)


def launch(x, weight, exponent, x_scale, w_scale, bias, out_scale, gelu, out, config=None):
    """The kernel on prepared operands into `out`; `config` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    overrides `config_for` (benchmarks/fp8_kernels.py sweeps them)."""
    m, k = x.shape
    n = out.shape[1]
    block_m, block_n, block_k, warps, stages = config or config_for(m, n, k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    kernel = _kernel
    if x.device.type == "cuda":
        from torch.library import wrap_triton
        kernel = wrap_triton(_kernel)
    int4 = weight.dtype == torch.uint8
    kernel[grid](x, weight, exponent if int4 else weight, x_scale, w_scale, bias if bias is not None else w_scale,
                 out_scale if out_scale is not None else x_scale, out, m, n, k,
                 x.stride(0), weight.stride(0), exponent.stride(0) if int4 else 0, out.stride(0),
                 INT4=int4, HAS_BIAS=bias is not None, GELU=gelu, FP8_OUT=out_scale is not None,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)


def _check(x, weight, exponent):
    if not AVAILABLE:
        raise RuntimeError("vitlab's FP8 kernel needs Triton (`pip install triton`; it comes with torch's CUDA wheels)")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("vitlab's FP8 kernel runs on a CUDA GPU (on a CPU only in Triton's interpreter, TRITON_INTERPRET=1)")
    if x.dtype != FP8 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"fp8_linear takes row-major 2-D e4m3 inputs, got {x.dtype} of shape {tuple(x.shape)}")
    k = x.shape[1]
    if weight.dtype == torch.uint8:
        if exponent is None or weight.shape[1] * 2 != k or exponent.shape[1] * INT4_GROUP != k:
            raise ValueError("int4 weights come as (out, in/2) packed codes with (out, in/128) exponents")
    elif weight.dtype != FP8 or weight.shape[1] != k:
        raise ValueError(f"fp8_linear weights are (out, {k}) e4m3 or packed int4, got {weight.dtype} {tuple(weight.shape)}")
    if k % 128:
        raise ValueError(f"fp8_linear needs inputs in multiples of 128, got {k}")
    if weight.dtype == torch.uint8 and config_for(x.shape[0], weight.shape[0], k)[2] != INT4_GROUP:
        raise ValueError(f"int4 weights are read one exponent group ({INT4_GROUP} inputs) per K block")


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, exponent: torch.Tensor | None, x_scale: torch.Tensor,
                w_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: torch.Tensor | None, gelu: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    _check(x, weight, exponent)
    out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=FP8 if out_scale is not None else out_dtype)
    launch(x, weight, exponent, x_scale, w_scale.reshape(-1), bias, out_scale, gelu, out)
    return out


if AVAILABLE and torch.cuda.is_available():
    # A custom op, so torch.compile keeps the kernel whole inside the compiled graph (and CUDA graphs capture it).
    fp8_linear = torch.library.triton_op("vitlab::fp8_linear", mutates_args=())(_fp8_linear)
else:
    fp8_linear = _fp8_linear
fp8_linear.__doc__ = """(M, K) e4m3 rows x weights -> (M, N): e4m3 (N, K) or packed int4 (N, K/2) with exponents
(N, K/128); x_scale a 0-d float32, w_scale (1, N) or (N,) float32; out_scale given: FP8 output."""

"""vitlab's own Triton GEMM for FP8 activations: `fp8_linear`, weights in e4m3 or packed int4.

Why a kernel of our own (measured on the H100, ViT-L/16, benchmarks/results/peers_h100.json):
cuBLAS's FP8 GEMM cannot apply GELU nor cast its output to FP8, so after fc1 a separate kernel read
the 16-bit activations back and wrote them as FP8 (10 ms of a 51 ms forward at batch 256); here both
happen in the GEMM's epilogue, in a persistent loop whose next tile loads while this one's epilogue
runs (fc1 at batch 256: 0.60 ms a layer in the model; cuBLAS plus the GELU kernel take 0.76 ms in
benchmarks/fp8_kernels.py).
At batch 1 (197 rows) cuBLAS offers FP8 only in 128x128 tiles, 16 thread blocks for a 1024-wide
layer on 132 multiprocessors; here the tiles follow the shape, and fc2's 4,096 inputs are split
across thread blocks. With int4 weights the kernel reads half a byte per weight and expands it to
FP8 in registers, 128 inputs (one exponent group) at a time: every code q times 2**-e is exact in
e4m3 (speed.int4_quantize), so the tensor cores multiply the 4-bit weights themselves. (Measured:
the expansion in registers costs more than it saves at batch 1, 1.89 ms against 1.11 with FP8
weights; see the README's speed section.)

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

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, persistent, splits of K). Many rows fill the GPU
# with large tiles; few rows (one image is 197) need small tiles, and K split across thread blocks,
# for enough of them. Measured per ViT-L/16 layer shape (N, K) on the H100 by benchmarks/fp8_kernels.py
# (benchmarks/results/fp8_kernels_h100.json); other shapes take the defaults.
LARGE = (128, 256, 128, 8, 3, True, 1)
SMALL = (64, 64, 128, 4, 4, False, 1)
TUNED = {  # (rows <= SMALL_M, N, K, int4 weights) -> config; at 197 rows: qkv, fc1 (GELU), fc2; o_proj takes SMALL
    (True, 3072, 1024, False): (64, 128, 128, 4, 3, False, 1), (True, 4096, 1024, False): (64, 128, 128, 4, 3, False, 1),
    (True, 1024, 4096, False): (64, 64, 128, 4, 4, False, 2),
    (True, 3072, 1024, True): (128, 32, 128, 4, 4, False, 2), (True, 1024, 1024, True): (128, 32, 128, 4, 4, False, 2),
    (True, 4096, 1024, True): (128, 64, 128, 4, 4, False, 1), (True, 1024, 4096, True): (128, 32, 128, 4, 4, False, 4),
}
SMALL_M = 1024  # up to this many rows vitlab's kernel beats cuBLAS's FP8 GEMM on every ViT-L/16 linear (H100)


def config_for(m: int, n: int, k: int, int4: bool) -> tuple[int, int, int, int, int, bool, int]:
    small = m <= SMALL_M
    return TUNED.get((small, n, k, int4), SMALL if small else LARGE)


if AVAILABLE:
    import triton
    import triton.language as tl

    def _linear_kernel(x_ptr, w_ptr, e_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                       M, N, K, stride_xm, stride_wn, stride_en, stride_om,
                       INT4: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FP8_OUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       PERSISTENT: tl.constexpr, SPLITS: tl.constexpr, MUFU: tl.constexpr):
        # One tile per program, or (PERSISTENT) one program per multiprocessor walking the tiles in a loop
        # flattened with its K loop, so the next tile's loads are in flight during this tile's epilogue.
        # (Without the loop one image ran in 1.18 ms, with it 1.21: H100, benchmarks/peers.py.)
        # SPLITS > 1: the second grid axis takes 1/SPLITS of K each and stores its scaled partial sums in
        # out[split] (float32), for the caller to add up.
        split_k = K // SPLITS
        k0 = tl.program_id(1) * split_k
        out_ptr += tl.program_id(1).to(tl.int64) * M * N
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0), flatten=True):
                _tile(tile, k0, split_k, x_ptr, w_ptr, e_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                      M, N, stride_xm, stride_wn, stride_en, stride_om,
                      INT4, HAS_BIAS, GELU, FP8_OUT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, MUFU)
        else:
            _tile(tl.program_id(0), k0, split_k, x_ptr, w_ptr, e_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                  out_ptr, M, N, stride_xm, stride_wn, stride_en, stride_om,
                  INT4, HAS_BIAS, GELU, FP8_OUT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, MUFU)

    def _tile(tile, k0, split_k, x_ptr, w_ptr, e_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
              M, N, stride_xm, stride_wn, stride_en, stride_om,
              INT4: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FP8_OUT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              MUFU: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) output tile over inputs k0 .. k0 + split_k."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * tiles_n
        # Tiles run in groups of GROUP_M row tiles, so neighbours share weight tiles in L2.
        first_m = (tile // in_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_m
        pid_n = (tile % in_group) // group_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        # Masked loads skip the rows and columns past the edge (one image's last 64-row tile has 5 of 64);
        # unmasked loads of clamped rows made one image's forward 0.06-0.35 ms slower on the H100.
        x_ptrs = x_ptr + rm[:, None] * stride_xm + k0 + tl.arange(0, BLOCK_K)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if INT4:
            # Bytes (BLOCK_K / 2, BLOCK_N), byte j holding inputs 2j (low nibble) and 2j + 1, expanded and
            # interleaved back into a (BLOCK_K, BLOCK_N) FP8 tile; BLOCK_K is one exponent group. (Two
            # 64-input dots on halves packed j | j + 64 instead ran batch 1 at 2.27 ms rather than 1.93.)
            w_ptrs = w_ptr + rn[None, :] * stride_wn + k0 // 2 + tl.arange(0, BLOCK_K // 2)[:, None]
            e_ptrs = e_ptr + rn * stride_en + k0 // BLOCK_K
            for k in range(0, split_k, BLOCK_K):
                packed = tl.load(w_ptrs, mask=n_ok[None, :], other=0x88)
                step = tl.exp2(-tl.load(e_ptrs, mask=n_ok, other=0).to(tl.float32))[None, :]
                low = ((packed & 15).to(tl.float32) - 8.0) * step
                high = ((packed >> 4).to(tl.float32) - 8.0) * step
                b = tl.join(low, high).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N).to(tl.float8e4nv)
                acc = tl.dot(tl.load(x_ptrs, mask=m_ok[:, None], other=0.0), b, acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K // 2
                e_ptrs += 1
        else:
            # The weight is (N, K) row-major: a (BLOCK_K, BLOCK_N) tile of its transpose.
            w_ptrs = w_ptr + rn[None, :] * stride_wn + k0 + tl.arange(0, BLOCK_K)[:, None]
            for k in range(0, split_k, BLOCK_K):
                acc = tl.dot(tl.load(x_ptrs, mask=m_ok[:, None], other=0.0), tl.load(w_ptrs, mask=n_ok[None, :], other=0.0), acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K

        y = acc * (tl.load(x_scale_ptr) * tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0))[None, :]
        if HAS_BIAS:  # never with SPLITS > 1 (launch)
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = _gelu(y, MUFU)
        if FP8_OUT:
            y = tl.clamp(y / tl.load(out_scale_ptr), -448.0, 448.0).to(tl.float8e4nv)
        else:
            y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    def _gelu(y, MUFU: tl.constexpr):
        """Exact (erf) GELU as transformers' "gelu", within 5e-7 of it in float32: erf from Abramowitz and
        Stegun 7.1.26 (one reciprocal, one exponential, five multiply-adds); GELU(y) = y * Phi(y), with
        Phi(y) = 1 - q for y >= 0 and q for y < 0. libdevice's erff took three times the instructions:
        in fc1's epilogue at batch 256 the GELU cost 60% of the main loop's time (H100,
        benchmarks/fp8_kernels.py). MUFU: the special-function unit's flush-to-zero reciprocal and
        exponential as single instructions (PTX's default division and exp2 wrap them in range checks);
        Triton's interpreter cannot run inline assembly, so it takes the plain operations."""
        d = 1.0 + 0.23163642 * tl.abs(y)  # 1 + p |y| / sqrt(2), p = 0.3275911
        e = -0.7213475204444817 * y * y  # log2 of exp(-y^2 / 2)
        if MUFU:
            t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1)
            ex = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [e], dtype=tl.float32, is_pure=True, pack=1)
        else:
            t, ex = 1.0 / d, tl.exp2(e)
        # A&S's coefficients halved: q = (1 - erf(|y| / sqrt(2))) / 2
        q = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145)))) * ex
        yq = y * q
        return tl.where(y >= 0, y - yq, yq)

    _gelu = triton.jit(_gelu)
    _tile = triton.jit(_tile)
    _kernel = triton.jit(_linear_kernel)


def launch(x, weight, exponent, x_scale, w_scale, bias, out_scale, gelu, out_dtype, config=None) -> torch.Tensor:
    """The kernel on prepared operands: the (M, N) output, or with K split (a linear epilogue only) the
    (splits, M, N) float32 partial sums without the bias, which `fp8_linear` adds up. `config`
    (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent, splits) overrides `config_for`
    (benchmarks/fp8_kernels.py sweeps them)."""
    m, k = x.shape
    n = weight.shape[0]
    int4 = weight.dtype == torch.uint8
    block_m, block_n, block_k, warps, stages, persistent, splits = config or config_for(m, n, k, int4)
    if gelu or out_scale is not None or k % (block_k * splits):
        splits = 1
    if splits > 1:
        out = torch.empty((splits, m, n), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((m, n), device=x.device, dtype=FP8 if out_scale is not None else out_dtype)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    kernel = _kernel
    if x.device.type == "cuda":
        from torch.library import wrap_triton
        kernel = wrap_triton(_kernel)
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 2  # the interpreter: enough for every program to walk several tiles
    kernel[(min(tiles, programs) if persistent else tiles, splits)](
        x, weight, exponent if int4 else weight, x_scale, w_scale, bias if bias is not None and splits == 1 else w_scale,
        out_scale if out_scale is not None else x_scale, out, m, n, k,
        x.stride(0), weight.stride(0), exponent.stride(0) if int4 else 0, n,
        INT4=int4, HAS_BIAS=bias is not None and splits == 1, GELU=gelu, FP8_OUT=out_scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, PERSISTENT=persistent, SPLITS=splits,
        MUFU=x.device.type == "cuda", num_warps=warps, num_stages=stages)
    return out


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
    if weight.dtype == torch.uint8 and config_for(x.shape[0], weight.shape[0], k, True)[2] != INT4_GROUP:
        raise ValueError(f"int4 weights are read one exponent group ({INT4_GROUP} inputs) per K block")


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, exponent: torch.Tensor | None, x_scale: torch.Tensor,
                w_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: torch.Tensor | None, gelu: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    _check(x, weight, exponent)
    out = launch(x, weight, exponent, x_scale, w_scale.reshape(-1), bias, out_scale, gelu, out_dtype)
    return add_partials(out, bias, out_dtype) if out.dim() == 3 else out


def add_partials(partials: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`launch`'s (splits, M, N) partial sums as the layer's output; under torch.compile this sum fuses
    into whatever reads the output."""
    out = partials.sum(0) if bias is None else partials.sum(0) + bias.float()
    return out.to(out_dtype)


if AVAILABLE and torch.cuda.is_available():
    # A custom op, so torch.compile keeps the kernel whole inside the compiled graph (and CUDA graphs capture it).
    fp8_linear = torch.library.triton_op("vitlab::fp8_linear", mutates_args=())(_fp8_linear)
else:
    fp8_linear = _fp8_linear
fp8_linear.__doc__ = """(M, K) e4m3 rows x weights -> (M, N): e4m3 (N, K) or packed int4 (N, K/2) with exponents
(N, K/128); x_scale a 0-d float32, w_scale (1, N) or (N,) float32; out_scale given: FP8 output."""

"""A run's params as typed, frozen sections that check themselves, without importing torch.

`Params.of(merged_dict)` turns the merged YAML (defaults <- variant <- --set) into one `Params`:
every value is checked against its field's type (choices are `Literal`s), its range (a field's
`rule`), then each section's own cross-field checks, then those that span sections. The first
problem raises one `ParamsError` naming the key and the fix. What needs this machine (a GPU, the
flash-attn package) is `machine.check`'s.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ParamsError

STEPS = ("finetune", "quantize", "evaluate", "ablation", "demo")  # runs.STEPS declares what each reads and writes
Attention = Literal["eager", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attention_2"]
ATTENTION = get_args(Attention)
GPU_ONLY_ATTENTION = ("sdpa_efficient", "sdpa_cudnn", "flash_attention_2")  # PyTorch's flash has a CPU kernel
Dtype = Literal["bfloat16", "float16", "float32"]
# vitlab's own formats of a linear (lowbit): FP8 static, or w{bits}a{8|16}: 4-, 3- or 2-bit weight codes (int4
# storage, kernels unchanged) with FP8 or 16-bit activations; "16bit" leaves a layer as it is.
Int4Format = Literal["w4a8", "w4a16", "w3a8", "w3a16", "w2a8", "w2a16"]
LayerFormat = Literal["16bit", "fp8", "w4a8", "w4a16", "w3a8", "w3a16", "w2a8", "w2a16"]
LAYER_FORMATS = get_args(LayerFormat)
FP8_ACTIVATIONS = tuple(f for f in LAYER_FORMATS if f == "fp8" or f.endswith("a8"))
AblationQuant = Literal["nf4", "fp4", "int8", "fp8", "w4a8", "w4a16", "w3a8", "w3a16", "w2a8", "w2a16"]  # ablation.FORMATS
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # it names the run folder
# transformers' ViTConfig().to_dict() keys (5.23; tests/test_settings.py checks it against the installed one),
# so an unknown model.config key is refused without importing transformers.
VIT_CONFIG_FIELDS = frozenset((
    "_name_or_path", "architectures", "attention_probs_dropout_prob", "chunk_size_feed_forward", "dtype",
    "encoder_stride", "hidden_act", "hidden_dropout_prob", "hidden_size", "id2label", "image_size",
    "initializer_range", "intermediate_size", "is_encoder_decoder", "label2id", "layer_norm_eps", "model_type",
    "num_attention_heads", "num_channels", "num_hidden_layers", "output_attentions", "output_hidden_states",
    "patch_size", "pooler_act", "pooler_output_size", "problem_type", "qkv_bias", "return_dict",
    "transformers_version"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def rule(test, what: str) -> Any:
    """A field whose value must pass `test`; `what` says what a valid value is."""
    return field(metadata={"rule": (test, what)})


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
POSITIVE = (lambda v: v > 0, "positive")
SHARE = (lambda v: 0 <= v < 1, "0 <= x < 1")
COUNT_OR_ALL = (lambda v: v is None or v >= 1, "at least 1, or null for all")


class Section:
    """A params section: `of` builds it from its dict, every value checked."""

    @classmethod
    def of(cls, raw: dict[str, Any], prefix: str | None = None):
        return _build(cls, raw, f"{cls.__name__.lower()}." if prefix is None else prefix)


def local_model(model_id: str | None) -> Path | None:
    """The directory a model.id names (absolute, or relative to the repo root like data.root), or None
    for a hub id (or null)."""
    if model_id is None:
        return None
    path = Path(model_id).expanduser()
    path = path if path.is_absolute() else REPO_ROOT / path
    return path if path.is_dir() else None


@dataclass(frozen=True)
class Lora(Section):
    r: int = rule(*AT_LEAST_1)
    alpha: float = rule(*POSITIVE)
    dropout: float = rule(*SHARE)
    target_modules: Union[str, list[str]] = rule(lambda v: bool(v), "'auto', 'attention', a module name (fc1) or a "
                                                 "list of names ([q_proj, v_proj])")


@dataclass(frozen=True)
class Model(Section):
    id: Union[str, None]
    config: dict
    init: Literal["default", "mimetic", "sincos", "mimetic_sincos"]
    grow_from: Union[str, None]  # a trained ViT checkpoint the random-init model grows from (wider, deeper)
    grow_depth: Literal["copies", "identity"]
    dtype: Dtype
    attention: Attention

    def __post_init__(self) -> None:
        for key in self.config:
            if key not in VIT_CONFIG_FIELDS:
                close = difflib.get_close_matches(key, sorted(VIT_CONFIG_FIELDS), n=1)
                hint = f"; did you mean 'model.config.{close[0]}'?" if close else ""
                raise ParamsError(f"unknown parameter 'model.config.{key}' (not a ViTConfig field){hint}")
        if self.init != "default" and self.id is not None:
            raise ParamsError(f"model.init '{self.init}' starts a model built from model.config; model.id ({self.id}) "
                              "brings its own weights: set model.id null or model.init default")
        if self.grow_from is not None and self.id is not None:
            raise ParamsError(f"model.grow_from ({self.grow_from}) starts a model built from model.config; model.id "
                              f"({self.id}) brings its own weights: set model.id null or model.grow_from null")
        if self.id is None:
            self._check_geometry()

    def _check_geometry(self) -> None:
        c = self.config
        for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "num_channels"):
            if key in c and (not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1):
                raise ParamsError(f"parameter 'model.config.{key}' is {c[key]!r}; it must be a whole number >= 1")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if key in c and not (isinstance(c[key], (int, float)) and 0 <= c[key] < 1):
                raise ParamsError(f"parameter 'model.config.{key}' is {c[key]!r}; it must be 0 <= x < 1")
        image, patch = c.get("image_size", 224), c.get("patch_size", 16)
        if image % patch:
            raise ParamsError(f"model.config.image_size {image} must be a multiple of model.config.patch_size {patch}")
        hidden, heads = c.get("hidden_size", 768), c.get("num_attention_heads", 12)
        if hidden % heads:
            raise ParamsError(f"model.config.hidden_size {hidden} must split evenly into num_attention_heads {heads}")

    def known_config(self) -> dict[str, Any]:
        """What is known of the model's config without loading it: model.config, or a local checkpoint's
        config.json (a hub id: nothing)."""
        if self.id is None:
            return self.config
        local = local_model(self.id)
        if local is not None and (local / "config.json").is_file():
            import json

            return json.loads((local / "config.json").read_text())
        return {}

    @property
    def layers(self) -> int | None:
        """The encoder depth, when it is known without loading the model."""
        return self.known_config().get("num_hidden_layers", 12 if self.id is None else None)  # ViTConfig's default


@dataclass(frozen=True)
class Data(Section):
    source: Literal["flowers102", "imagefolder", "digits"]
    root: str
    classes: Literal["all", "half_a", "half_b"]
    class_split_seed: int = rule(*NON_NEGATIVE)
    max_per_class: Union[int, None] = rule(*COUNT_OR_ALL)
    max_samples: Union[int, None] = rule(*COUNT_OR_ALL)
    valid_fraction: float = rule(lambda v: 0 < v < 0.5, "between 0 and 0.5")
    test_fraction: float = rule(lambda v: 0 < v < 0.5, "between 0 and 0.5")
    crop_scale: list[float] = rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                                   "two numbers 0 < low <= high <= 1, e.g. [0.5, 1.0]")
    hflip: bool
    trivial_augment: bool
    random_erasing: float = rule(lambda v: 0 <= v <= 1, "a probability, 0 <= x <= 1")
    max_image_pixels: int = rule(lambda v: v >= 1, "a pixel count, e.g. 60000000")
    train_image_size: Union[int, None] = rule(lambda v: v is None or v >= 1, "a size in pixels, or null for the model's")
    pipeline: Literal["pil", "gpu"]
    num_workers: int = rule(*NON_NEGATIVE)

    def __post_init__(self) -> None:
        if self.train_image_size is not None and self.pipeline != "gpu":
            raise ParamsError("data.train_image_size resizes training crops on the gpu pipeline: set data.pipeline: gpu")


@dataclass(frozen=True)
class Finetune(Section):
    method: Literal["lora", "qlora", "full", "probe", "none", "qat"]
    epochs: int = rule(*AT_LEAST_1)
    batch_size: int = rule(*AT_LEAST_1)
    lr: float = rule(lambda v: v > 0, "positive (e.g. 0.001)")
    weight_decay: float = rule(*NON_NEGATIVE)
    warmup_ratio: float = rule(lambda v: 0 <= v < 1, "a share of the steps, 0 <= x < 1")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"]
    max_grad_norm: float = rule(*POSITIVE)
    label_smoothing: float = rule(lambda v: 0 <= v < 1, "0 <= x < 1 (0.1 is usual)")
    mixup_alpha: float = rule(lambda v: v >= 0, "0 (off) or more")
    cutmix_alpha: float = rule(lambda v: v >= 0, "0 (off) or more")
    ema_decay: float = rule(lambda v: 0 <= v < 1, "0 (off) <= x < 1 (0.999 is usual)")
    select: Literal["last", "best_valid"]
    valid_every: int = rule(*AT_LEAST_1)
    compile: Union[bool, Literal["blocks"]]  # true: the whole model; blocks: each encoder block (regional)
    cuda_graph: bool
    accumulate: int = rule(*AT_LEAST_1)
    processes: int = rule(*AT_LEAST_1)
    drop_path: float = rule(lambda v: 0 <= v < 1, "0 (off) <= x < 1 (0.1 is usual)")
    full_size_epochs: int = rule(*NON_NEGATIVE)
    checkpoint_minutes: float = rule(lambda v: v >= 0, "0 (every epoch) or more")
    qlora_base: Literal["bitsandbytes", "torchao"]  # method qlora's NF4 base: a library call, or torch ops
    qat_format: Union[LayerFormat, None]  # method qat: the format fake-quantized in training (speed runs the same)
    teacher: Union[str, None]  # a checkpoint trained on the same classes: its predictions are a second target
    distill_alpha: float = rule(lambda v: 0 <= v <= 1, "the teacher's share of the loss, 0 to 1 (0.5 is DeiT's)")
    lora: Lora

    def __post_init__(self) -> None:
        bnb_base = self.method == "qlora" and self.qlora_base == "bitsandbytes"
        if self.cuda_graph and (self.compile is True or self.mixed_precision == "fp16" or bnb_base):
            raise ParamsError("finetune.cuda_graph captures the bf16 training step: it does not combine with "
                              "finetune.compile: true (compile: blocks it does), mixed_precision fp16 (loss scaling syncs "
                              "with the host) or method qlora on bitsandbytes (finetune.qlora_base: torchao it does)")
        if self.qlora_base != "bitsandbytes" and self.method != "qlora":
            raise ParamsError(f"finetune.qlora_base is method qlora's 4-bit base; method {self.method} has none: "
                              "leave it bitsandbytes, or set finetune.method: qlora")
        if self.batch_size % (self.processes * self.accumulate):
            raise ParamsError(f"finetune.batch_size {self.batch_size} is the whole step's batch: it must split evenly "
                              f"into finetune.processes ({self.processes}) x finetune.accumulate ({self.accumulate}) "
                              "micro-batches")
        if (self.method == "qat") != (self.qat_format not in (None, "16bit")):
            raise ParamsError("finetune.method qat trains the model as the format it will run in: set finetune.qat_format "
                              f"to one of {list(LAYER_FORMATS[1:])} with it, and only with it")
        if self.processes > 1 and self.method == "qat":
            raise ParamsError("finetune.method qat trains in one process: set finetune.processes: 1")
        if self.processes > 1 and (self.cuda_graph or self.method == "qlora"):
            raise ParamsError("finetune.processes > 1 trains with DDP, which vitlab does not capture in a CUDA graph "
                              "(finetune.cuda_graph) nor run on a 4-bit base (method qlora): one process for those")


@dataclass(frozen=True)
class Quant(Section):
    bits: Literal[16, 8, 4]
    type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Dtype
    int8_threshold: float = rule(lambda v: v > 0, "positive (6.0 is LLM.int8's)")
    keep_16bit: Union[str, list[Union[int, str]]]

    def __post_init__(self) -> None:
        if isinstance(self.keep_16bit, str) and self.keep_16bit != "first_last":
            raise ParamsError(f"quant.keep_16bit is '{self.keep_16bit}'; a string must be 'first_last', otherwise "
                              "give a list of layer indices (0, -1) or name patterns ('attention')")

    def describe(self) -> str:
        if self.bits == 16:
            return "16-bit"
        return "int8" if self.bits == 8 else self.type + ("+dq" if self.double_quant else "")


@dataclass(frozen=True)
class Speed(Section):
    """How evaluate runs the variant, applied in this order: fused q/k/v and patch matmul, low-bit
    linears (vitlab's FP8 or int4 ones, or torchao's), torch.compile, CUDA-graph replay."""
    torchao: Literal["none", "fp8", "int8dyn", "int4wo"] = "none"
    compile: Literal["none", "model", "blocks", "linears"] = "none"
    compile_mode: Literal["default", "max-autotune"] = "default"
    cuda_graph: bool = False
    fuse_qkv: bool = False
    patch_matmul: bool = False
    fp8: Literal["none", "static"] = "none"
    int4: Union[Literal["none"], Int4Format] = "none"
    fp8_gemm: Literal["cublas", "triton"] = "cublas"
    calibration_batches: int = field(default=4, metadata={"rule": AT_LEAST_1})
    keep_16bit: Union[str, list[Union[int, str]]] = field(default_factory=list)
    layer_formats: list[LayerFormat] = field(default_factory=list)  # one per encoder layer (the mixed choice)

    def __post_init__(self) -> None:
        quantizing = [f"speed.{k} '{getattr(self, k)}'" for k in ("fp8", "int4", "torchao") if getattr(self, k) != "none"]
        if len(quantizing) > 1:
            raise ParamsError(f"{' and '.join(quantizing)} all quantize the linears: pick one")
        if self.keep_16bit and self.fp8 == "none" and self.int4 == "none":
            raise ParamsError("speed.keep_16bit leaves layers out of vitlab's FP8 / int4 linears: set speed.fp8: static "
                              "or speed.int4")
        if isinstance(self.keep_16bit, str) and self.keep_16bit != "first_last":
            raise ParamsError(f"speed.keep_16bit is '{self.keep_16bit}'; a string must be 'first_last', otherwise "
                              "give a list of layer indices (0, -1) or name patterns ('attention')")
        if self.layer_formats and (quantizing or self.keep_16bit):
            raise ParamsError("speed.layer_formats gives every encoder layer its own format: leave speed.fp8, speed.int4, "
                              "speed.torchao and speed.keep_16bit unset with it")
        if self.fp8_gemm == "triton" and not self.calibrates:
            raise ParamsError("speed.fp8_gemm: triton runs FP8 activations: set speed.fp8: static, speed.int4: w4a8 "
                              "(or another a8 format), or an FP8-activation format in speed.layer_formats")

    @property
    def uniform_format(self) -> str | None:
        """The one format of every block linear (fp8, w4a8, ...), or None (16-bit, per-layer formats, torchao)."""
        return "fp8" if self.fp8 == "static" else None if self.int4 == "none" else self.int4

    @classmethod
    def from_params(cls, speed_params: dict[str, Any]) -> "Speed":
        return cls.of(speed_params)

    @property
    def rewrites(self) -> list[str]:
        """The settings that replace the 16-bit model's linears (they need quant.bits: 16)."""
        return ([f"speed.{k} {getattr(self, k)}" for k in ("torchao", "fp8", "int4") if getattr(self, k) != "none"]
                + [f"speed.{k}" for k in ("fuse_qkv", "patch_matmul", "layer_formats") if getattr(self, k)])

    @property
    def active(self) -> bool:
        return bool(self.rewrites) or self.compile != "none" or self.cuda_graph

    @property
    def calibrates(self) -> bool:
        """Whether applying these settings needs real images (static FP8 activation scales)."""
        return self.uniform_format in FP8_ACTIVATIONS or any(f in FP8_ACTIVATIONS for f in self.layer_formats)

    def describe(self) -> str:
        parts = ["fused qkv"] if self.fuse_qkv else []
        parts += ["patch matmul"] if self.patch_matmul else []
        parts += [f"fp8 {self.fp8}"] if self.fp8 != "none" else []
        parts += [f"int4 {self.int4}"] if self.int4 != "none" else []
        parts += [f"16-bit {self.keep_16bit}"] if self.keep_16bit else []
        parts += ["formats " + ",".join(self.layer_formats)] if self.layer_formats else []
        parts += [f"{self.fp8_gemm} gemm"] if self.fp8_gemm != "cublas" else []
        parts += [f"torchao {self.torchao}"] if self.torchao != "none" else []
        parts += [f"compile {self.compile}" + (f" {self.compile_mode}" if self.compile_mode != "default" else "")
                  ] if self.compile != "none" else []
        parts += ["cuda graph"] if self.cuda_graph else []
        return " + ".join(parts)

    def replace(self, **changes: Any) -> "Speed":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Eval(Section):
    batch_size: int = rule(*AT_LEAST_1)
    processes: int = rule(*AT_LEAST_1)
    latency_batch_sizes: list[int] = rule(lambda v: bool(v) and all(b >= 1 for b in v),
                                          "a non-empty list of batch sizes >= 1")
    warmup: int = rule(*NON_NEGATIVE)
    iters: int = rule(*AT_LEAST_1)
    profile: bool
    profile_batch_size: int = rule(*AT_LEAST_1)
    profile_iters: int = rule(*AT_LEAST_1)


@dataclass(frozen=True)
class Ablation(Section):
    quant_types: list[AblationQuant] = rule(bool, f"a non-empty list of {list(get_args(AblationQuant))}")
    split: Literal["train", "valid", "test"]
    budget_mb: Union[float, None] = rule(lambda v: v is None or v > 0, "a positive size in MB, or null")
    max_top1_drop_pt: Union[float, None] = rule(lambda v: v is None or 0 <= v <= 100,
                                                "in top-1 points (0 to 100), or null")
    verify_split: Literal["train", "valid", "test"]
    processes: int = rule(*AT_LEAST_1)
    formats: list[LayerFormat]  # the per-layer menu of the latency-measured mixed choice ([]: no such choice)
    latency_budget_ms: Union[float, None] = rule(lambda v: v is None or v > 0, "a positive latency in ms, or null")
    latency_batch_size: int = rule(*AT_LEAST_1)
    mixed_points: int = rule(*NON_NEGATIVE)

    def __post_init__(self) -> None:
        if self.latency_budget_ms is not None and not self.formats:
            raise ParamsError("ablation.latency_budget_ms chooses among per-layer mixes of ablation.formats: list them "
                              "(e.g. [16bit, fp8, w4a8])")
        missing = [f for f in self.formats if f != "16bit" and f not in self.quant_types]
        if missing:
            raise ParamsError(f"ablation.formats {missing} need their per-layer sensitivity: add them to "
                              "ablation.quant_types too")


@dataclass(frozen=True)
class Params(Section):
    variant: str
    seed: int = rule(*NON_NEGATIVE)
    device: str = rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N")
    steps: list[str] = rule(bool, f"at least one of {list(STEPS)}")
    model: Model
    data: Data
    finetune: Finetune
    quant: Quant
    speed: Speed
    eval: Eval
    ablation: Ablation

    def __post_init__(self) -> None:
        if not VARIANT_NAME.match(self.variant):
            raise ParamsError(f"variant {self.variant!r} names the run folder: use letters, digits, '_', '-' and '.'")
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ParamsError(f"unknown step(s) {bad} in 'steps'; choose from {list(STEPS)}")
        ordered = sorted(set(self.steps), key=STEPS.index)
        if list(self.steps) != ordered:
            raise ParamsError(f"'steps' {list(self.steps)} must name each step once, in the order they run: {ordered}")
        if "finetune" in self.steps:
            self._check_training()
        self._check_sizes()
        qat = self.finetune.qat_format
        if "finetune" in self.steps and self.finetune.method == "qat" and self.speed.uniform_format != qat:
            raise ParamsError(f"finetune.method qat trains for {qat}, so evaluate must run {qat}: set "
                              + ("speed.fp8: static" if qat == "fp8" else f"speed.int4: {qat}")
                              + f" (speed runs {self.speed.uniform_format or '16-bit'})")
        if self.speed.rewrites and self.quant.bits != 16:
            raise ParamsError(f"{', '.join(self.speed.rewrites)} rewrite the 16-bit model's linears themselves: set "
                              f"quant.bits: 16 (it is {self.quant.bits}), or turn them off")

    def _check_training(self) -> None:
        ft = self.finetune
        if self.model.id is None and ft.method != "full":
            raise ParamsError(f"finetune.method '{ft.method}' starts from a trained model, but model.id is null "
                              "(random init): set model.id to a hub id or a local checkpoint dir, or use "
                              "finetune.method: full")

    def _check_sizes(self) -> None:
        if self.data.train_image_size is not None:
            patch = self.model.known_config().get("patch_size", 16)
            if self.data.train_image_size % patch:
                raise ParamsError(f"data.train_image_size {self.data.train_image_size} must be a multiple of the patch "
                                  f"size ({patch})")
            if self.finetune.full_size_epochs > self.finetune.epochs:
                raise ParamsError(f"finetune.full_size_epochs ({self.finetune.full_size_epochs}) is more than "
                                  f"finetune.epochs ({self.finetune.epochs})")
        layers = self.model.layers
        for name, keep in (("quant", self.quant.keep_16bit), ("speed", self.speed.keep_16bit)):
            for item in keep if isinstance(keep, list) else []:
                if isinstance(item, int) and layers is not None and not -layers <= item < layers:
                    raise ParamsError(f"{name}.keep_16bit names layer {item}, but the model has {layers} encoder "
                                      f"layers (0..{layers - 1}, or -1 for the last)")
        if self.speed.layer_formats and layers is not None and len(self.speed.layer_formats) != layers:
            raise ParamsError(f"speed.layer_formats lists {len(self.speed.layer_formats)} formats, but the model has "
                              f"{layers} encoder layers: give one per layer")

    @classmethod
    def of(cls, params: dict[str, Any], prefix: str = "") -> "Params":
        """The typed, checked form of merged params (defaults <- variant <- overrides)."""
        return _build(cls, params, prefix)


# --- turning a dict into a section ---------------------------------------------------------------

def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return f"one of {list(get_args(hint))}"
    if get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return {int: "int", float: "float", bool: "bool (true/false)", str: "str", dict: "a mapping",
            type(None): "null"}.get(hint, str(hint))


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if origin is Union:
        return any(_fits(value, a) for a in get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_fits(v, get_args(hint)[0]) for v in value)
    if hint is float:  # an int is a fine float; infinities and NaN are never meant
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_value(dotted: str, value: Any, hint: Any, f: dataclasses.Field) -> Any:
    if not _fits(value, hint):
        item = get_args(hint)[0] if get_origin(hint) is list else None
        if get_origin(item) is Literal and isinstance(value, list):
            bad = next(v for v in value if not _fits(v, item))
            raise ParamsError(f"parameter '{dotted}' holds {bad!r}; choose from {list(get_args(item))}")
        if get_origin(hint) is Literal:
            raise ParamsError(f"parameter '{dotted}' is {value!r}; choose one of {list(get_args(hint))}")
        if hint is float and isinstance(value, float):
            raise ParamsError(f"parameter '{dotted}' is {value!r}; it must be a finite number")
        what = f" ({f.metadata['rule'][1]})" if "rule" in f.metadata else ""
        raise ParamsError(f"parameter '{dotted}' must be {_type_name(hint)}{what}, got {value!r} "
                          f"({type(value).__name__})")
    if "rule" in f.metadata:
        test, what = f.metadata["rule"]
        if not test(value):
            raise ParamsError(f"parameter '{dotted}' is {value!r}; it must be {what}")
    return float(value) if hint is float else value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"'{prefix.rstrip('.')}' must be a mapping of parameters, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ParamsError(f"unknown parameter '{prefix}{key}'{hint} (valid keys are in defaults.yaml)")
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        if f.name not in raw:
            if f.default is not dataclasses.MISSING:
                continue
            raise ParamsError(f"parameter '{dotted}' is missing (every key is in defaults.yaml)")
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], raw[f.name], dotted + ".")
        else:
            values[f.name] = _check_value(dotted, raw[f.name], hints[f.name], f)
    return cls(**values)

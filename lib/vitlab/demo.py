"""The demo widget: pick a run and a variant, upload or pick an image, see its top-5 classes and latency."""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import ipywidgets as W
import torch
import transformers
from PIL import Image

from . import data, images, infer, machine, models, run_models, runs, speed


MAX_UPLOAD_BYTES = 20 * 2**20  # a photo is a few MB; more is a mistake or an attack


def read_upload(name: str, content: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = images.MAX_IMAGE_PIXELS) -> Image.Image:
    """An uploaded file as an RGB image, or a DataError that says why not (too large, too many pixels,
    not an image), before anything large is decoded."""
    if len(content) > max_bytes:
        raise data.DataError(f"{name} is {len(content) / 2**20:.1f} MB; this demo takes images up to "
                             f"{max_bytes / 2**20:.0f} MB")
    return images.open_image(bytes(content), max_pixels=max_pixels, name=name, advice="upload a JPEG or PNG photo")


def expects(run_dir: Path) -> str:
    """What the run's model was trained on, said next to the upload: it only knows those images."""
    params = runs.load_params(run_dir)
    source = params["data"]["source"]
    if source == "digits":
        return ("this model knows scikit-learn's handwritten digits: a white digit on black, 8 x 8 pixels "
                "(any image is resized to its input)")
    if source == "flowers102":
        return "this model knows the 102 flowers of Oxford Flowers-102: a photograph of one flower"
    return f"this model knows the classes of {params['data']['root']}: an image like those in its train/ folder"


def finished_runs(runs_dir: str | Path = runs.RUNS_DIR) -> list[Path]:
    """Runs whose steps the demo needs finished and that still hold a model's weights, newest first."""
    return [r for r in reversed(runs.list_runs(runs_dir))
            if all(runs.done(r, s) for s in runs.STEPS["demo"].needs) and variants(r)]


def variants(run_dir: Path) -> dict[str, run_models.RunModel]:
    """The models of a run by label, as evaluate names them, whose weights are here: a run folder copied
    from a GPU machine without its 16-bit checkpoint (600 MB at ViT-L/16) still shows its quantized model."""
    return {m.label: m for m in run_models.models_of(run_dir) if (m.path / "model.safetensors").is_file()}


class Predictor:
    """Loads each (run, variant) model once, as evaluate runs it, and classifies single images with it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type  # a latency's device
        self._models: dict[tuple[Path, str], tuple] = {}

    def _load(self, run_dir: Path, variant: str) -> tuple:
        key = (run_dir, variant)
        if key not in self._models:
            entry = variants(run_dir)[variant]
            params = runs.load_params(run_dir)
            settings = models.ModelSettings.from_params(params["model"])

            def valid():  # only the settings that calibrate FP8 scales ask for them (speed.fp8: static, int4: w4a8)
                return data.for_checkpoint(params["data"], params["seed"], entry.path).loader("valid", params["eval"]["batch_size"])

            model = run_models.load(entry, settings, self.device, valid)
            processor = transformers.AutoImageProcessor.from_pretrained(entry.path)
            size = processor.size.get("height") or processor.size.get("shortest_edge")
            transform = data.transforms(size, processor.image_mean, processor.image_std, train=False)
            config = speed.unwrapped(model).config
            names = [config.id2label[i] for i in range(config.num_labels)]
            self._models[key] = (model, transform, names)
        return self._models[key]

    def predict(self, run_dir: Path, variant: str, image: Image.Image) -> tuple[list[tuple[str, float]], float]:
        model, transform, names = self._load(run_dir, variant)
        infer.top_k(model, image, transform, names, self.device)  # first call pays one-off set-up costs
        return infer.top_k(model, image, transform, names, self.device)


def test_images(run_dir: Path, n: int = 12) -> list[tuple[str, Image.Image]]:
    """The first n images of the run's test split with their true class names. A DataError when the run's
    data is not on this machine (its data.root is another machine's path)."""
    params = runs.load_params(run_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(next(iter(variants(run_dir).values())).path)
    splits = data.load_splits(params["data"], params["seed"],
                              processor.size.get("height") or processor.size.get("shortest_edge"))
    return [(f"#{i}: {splits.class_names[splits.test[i][1]]}", splits.test[i][0]) for i in range(min(n, len(splits.test)))]


def result_html(top: list[tuple[str, float]], ms: float, variant: str, source: str = "", where: str = "") -> str:
    """Top-k classes of one image (named by `source`) as labelled probability bars, and the latency (on
    `where`, the device: a 4-bit ViT-L/16 takes ~8 s on a 2-core CPU, 3 ms on an H200 as a CUDA graph)."""
    bars = "".join(
        f'<div class="vitlab-row" style="display:flex;align-items:center;margin:3px 0">'
        f'<span class="vitlab-class" style="width:180px;font-family:sans-serif">{html.escape(name)}</span>'
        f'<span style="background:#4c72b0;height:14px;width:{max(p * 260, 1):.0f}px"></span>'
        f'<span style="margin-left:6px;font-family:monospace">{p:.1%}</span></div>'
        for name, p in top)
    about = f'<span class="vitlab-source">{html.escape(source)}</span> · ' if source else ""
    on = f", {html.escape(where)}" if where else ""
    return (f'<div class="vitlab-result">{about}<b>{html.escape(variant)}</b> · latency {ms:.2f} ms (batch 1{on})'
            f"{bars}</div>")


def _thumbnail(image: Image.Image, size: int = 160) -> bytes:
    buf = io.BytesIO()
    image.resize((size, size), Image.NEAREST if min(image.size) < 64 else Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def _ordered(runs_dir: str | Path, first: Path | None) -> list[Path]:
    run_dirs = finished_runs(runs_dir)
    if first is not None and Path(first) in run_dirs:
        run_dirs.remove(Path(first))
        run_dirs.insert(0, Path(first))
    return run_dirs


def _error_html(error: Exception) -> str:
    return f'<div class="vitlab-error" style="color:#b00020">{html.escape(str(error))}</div>'


def app(runs_dir: str | Path = runs.RUNS_DIR, device: torch.device | None = None, first: Path | None = None) -> W.VBox:
    """The widget: run and variant dropdowns, upload or test-image picker, what the model expects, image,
    top-5 bars, latency. `first`: the run selected at the start (default: the newest finished one)."""
    predictor, run_dirs = Predictor(device or machine.resolve_device("auto")), _ordered(runs_dir, first)
    if not run_dirs:
        return W.VBox([W.HTML(f"<b>No run with a finished quantize step under {runs_dir}.</b> "
                              "Run one first: <code>python -m vitlab run params/offline.yaml</code>")])
    run_pick = W.Dropdown(options=[(r.name, r) for r in run_dirs], description="run", layout=W.Layout(width="420px"))
    variant_pick, sample_pick = W.Dropdown(description="variant"), W.Dropdown(description="test image")
    upload = W.FileUpload(accept="image/*", multiple=False, description="Upload image")
    picture, result, hint = W.Image(format="png", width=160, height=160), W.HTML(), W.HTML()
    result.add_class("vitlab-demo-result")
    state: dict[str, Any] = {"image": None, "source": ""}

    def show(image: Image.Image | None = None, source: str = "") -> None:
        if image is not None:
            state.update(image=image, source=source)
            picture.value = _thumbnail(image)
        if state["image"] is not None:
            top, ms = predictor.predict(run_pick.value, variant_pick.value, state["image"])
            result.value = result_html(top, ms, f"{run_pick.value.name} · {variant_pick.value}", state["source"],
                                       predictor.where)

    def on_run(_=None) -> None:
        # ipywidgets 8 selects nothing when options are replaced: select the first ones, which shows a prediction.
        try:
            samples, missing = test_images(run_pick.value), ""
        except data.DataError as e:  # a run folder from another machine: its photos stay there, uploads work
            samples, missing = [], f" · no test images here ({e}): upload a photo"
        hint.value = f"<i>{html.escape(expects(run_pick.value) + missing)}</i>"
        variant_pick.options = list(variants(run_pick.value))
        variant_pick.index = 0
        sample_pick.options = [(label, img) for label, img in samples]
        sample_pick.index = 0 if samples else None

    def on_sample(change) -> None:
        if change["new"] is not None:
            show(change["new"], "test image " + next(n for n, img in sample_pick.options if img is change["new"]))

    def on_upload(change) -> None:
        if change["new"]:
            name, content = change["new"][0]["name"], change["new"][0]["content"]
            try:
                show(read_upload(name, content), f"uploaded {name}")
            except data.DataError as e:  # the previous picture and answer go: they are not this file's
                state["image"], picture.value, result.value = None, b"", _error_html(e)

    run_pick.observe(on_run, names="value")
    variant_pick.observe(lambda _: show(), names="value")
    sample_pick.observe(on_sample, names="value")
    upload.observe(on_upload, names="value")
    on_run()
    return W.VBox([W.HBox([run_pick, variant_pick]), W.HBox([sample_pick, upload]), hint, W.HBox([picture, result])])

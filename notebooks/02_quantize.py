# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Quantize
# Load the merged 16-bit checkpoint of the fine-tune step and quantize it with bitsandbytes as
# `quant` asks: LLM.int8 (`bits: 8`) or 4-bit NF4/FP4 (`bits: 4`, optionally double-quantized),
# keeping the layers of `quant.keep_16bit` in 16-bit. Writes the quantized model (bitsandbytes
# serialisation), its sizes and a per-layer table into `<run>/quantize/`.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
import torch
import transformers
from IPython.display import Markdown, display

from vitlab import data, infer, models, quant, runs

params, run_dir, out, device = runs.open_step("quantize", params, run_dir, params_file)
checkpoint = run_dir / "finetune" / "model"
q = params["quant"]
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **quantization** `{quant.describe(q)}` "
                 f"· **keep_16bit** `{q['keep_16bit']}`"))

# %%
base = models.load_checkpoint(checkpoint, models.DTYPES[params["model"]["dtype"]], params["model"]["attention"], device)
keep = quant.resolve_keep(base, q["keep_16bit"])
model = quant.quantize(checkpoint, q, params["model"], device, keep)
table = quant.layer_table(model)
table.groupby(["component", "class", "weight_dtype"]).agg(modules=("module", "count"), bytes=("bytes", "sum"))

# %% [markdown]
# Every linear layer, which are quantized and what they weigh:

# %%
with pd.option_context("display.max_rows", 400):
    display(table)

# %% [markdown]
# ## Save and compare with the 16-bit model
# Sizes: on disk (the saved folder) and in memory (parameters, buffers and quantization state).
# Output drift on a test batch: relative L2 error of the logits and top-1 agreement.

# %%
model.save_pretrained(str(out / "model"))
transformers.AutoImageProcessor.from_pretrained(checkpoint).save_pretrained(str(out / "model"))
table.to_csv(out / "layers.csv", index=False)

ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
x, _ = next(iter(ds.loader("test", params["eval"]["batch_size"])))
ref, _ = infer.predict(base, [(x, torch.zeros(len(x)))], device, params["model"]["attention"])
got, _ = infer.predict(model, [(x, torch.zeros(len(x)))], device, params["model"]["attention"])
drift = {"rel_l2_logits": float(((got - ref) ** 2).sum() ** 0.5 / (ref ** 2).sum() ** 0.5),
         "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "images": len(x)}

summary = {
    "quantization": quant.describe(q), "bits": q["bits"], "keep_16bit": q["keep_16bit"], "kept_modules": keep,
    "quantized_modules": int(table["quantized"].sum()), "linear_modules": len(table),
    "disk_bytes": quant.dir_bytes(out / "model"), "disk_bytes_16bit": quant.dir_bytes(checkpoint),
    "footprint_bytes": models.parameter_bytes(model), "footprint_bytes_16bit": models.parameter_bytes(base),
    **drift,
}
runs.write_json(out / "quant.json", summary)
pd.DataFrame([
    {"model": "16-bit (fine-tune step)", "disk MB": summary["disk_bytes_16bit"] / 2**20,
     "memory MB": summary["footprint_bytes_16bit"] / 2**20, "rel. L2 error of logits": 0.0, "top-1 agreement": 1.0},
    {"model": f"{quant.describe(q)} (this step)", "disk MB": summary["disk_bytes"] / 2**20,
     "memory MB": summary["footprint_bytes"] / 2**20, "rel. L2 error of logits": drift["rel_l2_logits"],
     "top-1 agreement": drift["top1_agreement"]},
]).set_index("model").round(4)

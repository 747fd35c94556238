# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Quantize
# The fine-tuned model is quantized after training (no retraining), the way a user would load it
# with transformers' bitsandbytes integration: LLM.int8 (`bits: 8`) or 4-bit NF4/FP4 (`bits: 4`,
# optionally double-quantized). `quant.keep_16bit` leaves chosen layers in 16-bit, because some
# layers lose more to rounding than others (04_ablation measures which). The quantized model is
# saved as bitsandbytes serialises it, for evaluate and the demo.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import data, evaluate, infer, models, quant, runs

params, run_dir, out, device = runs.open_step("quantize", params, run_dir, params_file)
settings = models.ModelSettings.from_params(params["model"])
q = quant.QuantSettings.from_params(params["quant"])
checkpoint = runs.path(run_dir, "checkpoint")
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **quantization** `{q.describe()}` "
                 f"· **keep_16bit** `{list(q.keep_16bit) if not isinstance(q.keep_16bit, str) else q.keep_16bit}`"))

# %%
base = models.load_checkpoint(checkpoint, settings, device)
keep = quant.resolve_keep(base, q.keep_16bit)
model = quant.quantize(checkpoint, q, settings, device, keep)
table = quant.layer_table(model)
table.groupby(["component", "class", "weight_dtype"]).agg(modules=("module", "count"), bytes=("bytes", "sum"))

# %% [markdown]
# Every linear layer, which are quantized and what they weigh:

# %%
with pd.option_context("display.max_rows", 400):
    display(table)

# %% [markdown]
# ## Save and compare with the 16-bit model
# A smaller model is only worth having if it still predicts like the original: sizes on disk and
# in memory, and the drift of its logits on a test batch (relative L2 error, top-1 agreement, KL).

# %%
quant.save(model, checkpoint, runs.path(run_dir, "quantized"))
table.to_csv(runs.path(run_dir, "layers"), index=False)

ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
batch = [next(iter(ds.loader("test", params["eval"]["batch_size"])))]
ref, _ = infer.predict(base, batch, device)
rows = [evaluate.measure(base, "16-bit (fine-tune step)", batch, device, len(ds.class_names), params["seed"], checkpoint, ref)[0],
        evaluate.measure(model, f"{q.describe()} (this step)", batch, device, len(ds.class_names), params["seed"],
                         runs.path(run_dir, "quantized"), ref)[0]]
runs.write_json(runs.path(run_dir, "quant_summary"), quant.summary(q, params["quant"]["keep_16bit"], keep, table, rows,
                                                                   images=len(batch[0][0])))
pd.DataFrame(rows).set_index("model")[["disk_mb", "footprint_mb", "logits_rel_err", "top1_agreement", "kl_to_ref"]].round(4)

# %%
runs.close_step(run_dir, "quantize")  # opened by hand: the step is marked finished (under `vitlab run` the runner marks it)

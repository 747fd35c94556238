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
# # 04 · Ablation: which layers can be quantized?
# For each quantization type of `ablation.quant_types`: quantize everything, then keep one encoder
# layer at a time in 16-bit (all others quantized), then the first and last layer, then all
# attention or all MLP linears. Each configuration is scored against the 16-bit model on the
# `ablation.split` split: top-1 (with a bootstrap 95% interval), top-5 and the KL divergence of its
# logits from the 16-bit logits. A layer whose 16-bit copy lowers the KL most is the most sensitive.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
import yaml
from IPython.display import Markdown, display

from vitlab import ablation, data, plots, runs

params, run_dir, out, device = runs.open_step("ablation", params, run_dir, params_file)
checkpoint = run_dir / "finetune" / "model"
split = params["ablation"]["split"]
ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
# The split is scored once per configuration: hold its batches in memory.
batches = list(ds.loader(split, params["eval"]["batch_size"]))
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **split** `{split}` "
                 f"({len(ds.splits[split])} images) · **types** {params['ablation']['quant_types']}"))

# %%
records = ablation.sweep(checkpoint, params["model"], params["quant"], params["ablation"]["quant_types"], batches,
                         device, params["seed"])
runs.write_json(out / "sensitivity.json", records)
rows = pd.DataFrame(records)
rows.to_csv(out / "sensitivity.csv", index=False)
rows.round(4)

# %% [markdown]
# ## Per-layer sensitivity
# KL divergence from the 16-bit model when only that layer stays in 16-bit: lower means keeping
# that layer recovers more. Top-1 differences smaller than the bootstrap interval are noise.

# %%
per_layer = rows[rows["layer"].notna()].astype({"layer": int})
plots.save(plots.sensitivity(per_layer, "kl"), out / "sensitivity_kl.png");

# %%
plots.save(plots.sensitivity(per_layer, "top1"), out / "sensitivity_top1.png");

# %% [markdown]
# ## Heuristics and sub-module groups

# %%
rows[rows["layer"].isna()].set_index(["quant", "config"])[["top1", "top1_lo", "top1_hi", "top5", "kl", "footprint_mb"]].round(4)

# %% [markdown]
# ## A mixed-precision choice under a memory budget, checked on held-out images
# Greedy on the measured sensitivity: keep the layers that save the most KL per MB of 16-bit weights
# until the budget is spent. The choice is then scored on `ablation.verify_split` next to the seeds'
# heuristics (first+last layer kept; layer 21 kept, for 24-layer models), with bootstrap intervals,
# and written as a params file that `vitlab run` takes.

# %%
verify = params["ablation"]["verify_split"]
verify_batches = list(ds.loader(verify, params["eval"]["batch_size"]))
n_layers = int(per_layer["layer"].max()) + 1
checks, choices = [], {}
for q in params["ablation"]["quant_types"]:
    mine = rows[rows["quant"] == q].set_index("config")
    full = rows.set_index("config").loc["16-bit", "footprint_mb"]
    budget = params["ablation"]["budget_mb"] or mine.loc["all quantized", "footprint_mb"] + (
        full - mine.loc["all quantized", "footprint_mb"]) / 4
    choice = ablation.choose_keep(records, q, budget)
    choices[q] = choice
    configs = ablation.heuristics(n_layers) + [(f"chosen {choice['keep_16bit']}", None, choice["keep_16bit"])]
    checks += ablation.sweep(checkpoint, params["model"], params["quant"], [q], verify_batches, device,
                             params["seed"], configs=configs)
    mixed = {**params, "variant": f"{params['variant']}_{q}_mixed",
             "quant": {**ablation.quant_config(params["quant"], q), "keep_16bit": choice["keep_16bit"]}}
    (out / f"{mixed['variant']}.yaml").write_text(yaml.safe_dump(mixed, sort_keys=False))
checks = pd.DataFrame(checks)
runs.write_json(out / "choice.json", {"choices": choices, "verify_split": verify, "checks": checks.to_dict("records")})
display(pd.DataFrame(choices).T)
checks.set_index(["quant", "config"])[["top1", "top1_lo", "top1_hi", "kl", "footprint_mb"]].round(4)

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
# `ablation.split` split: top-1 and the KL divergence of its logits from the 16-bit logits, each
# with a bootstrap 95% interval, and top-5. A layer whose 16-bit copy lowers the KL most is the most
# sensitive. Then the layers are ranked by KL saved per MB, every prefix of that ranking is measured
# ("greedy k"), and one is chosen under a size or accuracy budget, checked on held-out images.

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
cols = ["top1", "top1_lo", "top1_hi", "top5", "kl", "kl_lo", "kl_hi", "footprint_mb"]
rows.set_index(["quant", "config"])[cols].round(5)

# %% [markdown]
# ## Per-layer sensitivity
# KL divergence from the 16-bit model when only that layer stays in 16-bit (lower: keeping that
# layer recovers more), and top-1; black bars are bootstrap 95% intervals over the images. Top-1
# differences inside the intervals are noise; the KL separates layers long before top-1 can.

# %%
plots.save(plots.sensitivity(rows, "kl"), out / "sensitivity_kl.png");

# %%
plots.save(plots.sensitivity(rows, "top1"), out / "sensitivity_top1.png");

# %% [markdown]
# ## A mixed-precision choice under a budget
# `ablation.budget_mb` caps the memory footprint: the measured greedy prefix with the lowest KL
# within it is chosen. `ablation.max_top1_drop_pt` caps the top-1 loss against the 16-bit model on
# this split: the smallest prefix within it is chosen. With neither set the size budget is a quarter
# of the way from fully quantized to 16-bit. Each choice is written as a params file `vitlab run` takes.

# %%
budgets = params["ablation"]
drop = None if budgets["max_top1_drop_pt"] is None else budgets["max_top1_drop_pt"] / 100
full = rows.set_index("config").loc["16-bit", "footprint_mb"]
choices = {}
for q in budgets["quant_types"]:
    smallest = rows[(rows["quant"] == q) & (rows["config"] == "all quantized")]["footprint_mb"].iloc[0]
    budget = budgets["budget_mb"]
    if budget is None and drop is None:
        budget = smallest + (full - smallest) / 4
    choices[q] = ablation.choose(records, q, budget, drop)
    mixed = {**params, "variant": f"{params['variant']}_{q}_mixed",
             "quant": {**ablation.quant_config(params["quant"], q), "keep_16bit": choices[q]["keep_16bit"]}}
    (out / f"{mixed['variant']}.yaml").write_text(yaml.safe_dump(mixed, sort_keys=False))
pd.DataFrame(choices).T

# %% [markdown]
# ## Accuracy against size: every configuration tried
# One point per configuration on this split (bars: bootstrap 95%); the grey step line is the Pareto
# front (no other configuration is both smaller and better), the star the choice.

# %%
plots.save(plots.pareto(rows, choices), out / "pareto.png");

# %% [markdown]
# ## The choice on held-out images, against the seeds' heuristics
# Scored on `ablation.verify_split`: the budget's choice next to all-quantized, first+last layer
# kept and (for 24-layer models) layer 21 kept; then, for each heuristic, the greedy choice given
# exactly that heuristic's memory. `d_top1` and `d_kl` are the greedy configuration minus the other
# one on the same images, with paired bootstrap 95% intervals: an interval that holds 0 is a tie.

# %%
verify = budgets["verify_split"]
verify_batches = list(ds.loader(verify, params["eval"]["batch_size"]))
checks = []
for q, c in choices.items():
    checks += ablation.check_choice(checkpoint, params["model"], params["quant"], c, records, verify_batches, device,
                                    params["seed"])
runs.write_json(out / "choice.json", {"choices": choices, "verify_split": verify, "checks": checks})
checks = pd.DataFrame(checks)
checks.set_index(["quant", "comparison", "config"])[[
    "footprint_mb", "top1", "top1_lo", "top1_hi", "d_top1", "d_top1_lo", "d_top1_hi", "kl", "d_kl", "d_kl_lo",
    "d_kl_hi"]].round(5)

# %%
lines = []
for (q, comparison), group in checks.groupby(["quant", "comparison"], sort=False):
    mine = group[group["chosen"]].iloc[0]
    for _, r in group[~group["chosen"]].iterrows():
        tie = r["d_top1_lo"] <= 0 <= r["d_top1_hi"]
        kl_word = "lower" if r["d_kl_hi"] < 0 else "higher" if r["d_kl_lo"] > 0 else "indistinguishable"
        lines.append(f"- **{q}**, {comparison}: *{mine['config']}* ({mine['footprint_mb']:.3f} MB) vs *{r['config']}* "
                     f"({r['footprint_mb']:.3f} MB): top-1 {r['d_top1'] * 100:+.2f} pt "
                     f"[{r['d_top1_lo'] * 100:+.2f}, {r['d_top1_hi'] * 100:+.2f}] ({'a tie' if tie else 'a real difference'}); "
                     f"KL {kl_word}: {r['d_kl']:+.2e} [{r['d_kl_lo']:+.2e}, {r['d_kl_hi']:+.2e}]")
display(Markdown(f"On the {verify} split ({int(checks['n'].iloc[0])} images):\n\n" + "\n".join(lines)))

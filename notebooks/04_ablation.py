# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Ablation: which layers can be quantized?
# Quantizing every layer is smallest, but layers differ in how much their rounding moves the output.
# Keeping the few sensitive ones in 16-bit can buy back most of the accuracy for little memory;
# the seeds guessed which (first and last layer). This step measures it instead: for each
# quantization type of `ablation.quant_types`, quantize everything, then keep one encoder layer at a
# time in 16-bit, then first+last, the last quarter of the layers, all attention, all MLP linears.
# The checkpoint is loaded once and each layer quantized once per type; a configuration swaps those
# layers in and out (exactly the model the quantize step would load). Each configuration is scored
# against the 16-bit model on `ablation.split`: top-1 and the KL divergence of its logits from the
# 16-bit logits, each with a bootstrap 95% interval.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import ablation, data, mixed, models, plots, quant, runs

params, run_dir, out, device = runs.open_step("ablation", params, run_dir, params_file)
settings = models.ModelSettings.from_params(params["model"])
base_quant = quant.QuantSettings.from_params(params["quant"])
checkpoint = runs.path(run_dir, "checkpoint")
budgets = params["ablation"]
split, verify = budgets["split"], budgets["verify_split"]
ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
# The split is scored once per configuration: hold its batches in memory.
batches = list(ds.loader(split, params["eval"]["batch_size"]))
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **split** `{split}` "
                 f"({len(ds.splits[split])} images) · **types** {budgets['quant_types']}"))

# %%
# With ablation.processes > 1 the configurations are spread over that many processes (one GPU each).
# Kept in the step's resume folder: a study stopped by `--time-limit` resumes after the sweep.
records = runs.kept(run_dir, "ablation", "sweep.json",
                    lambda: ablation.sweep_for_run(checkpoint, settings, base_quant, params, batches, device))
runs.write_json(runs.path(run_dir, "sensitivity"), records)
rows = pd.DataFrame(records)
rows.to_csv(runs.path(run_dir, "sensitivity_table"), index=False)
rows.set_index(["quant", "config"])[["top1", "top1_lo", "top1_hi", "top5", "kl", "kl_lo", "kl_hi", "footprint_mb"]].round(5)

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
# Savings of single layers do not add up, so the layers are ranked by KL saved per MB and every
# prefix of that ranking ("greedy k") was measured above. `ablation.budget_mb` caps the memory: the
# measured prefix with the lowest KL within it wins. `ablation.max_top1_drop_pt` caps the top-1 loss
# against the 16-bit model on this split: the smallest prefix within it wins. With neither set the
# size budget is a quarter of the way from fully quantized to 16-bit. Each choice is written as a
# params file `vitlab run` takes: it starts from this run's trained checkpoint as it is (nothing is
# trained again) and quantizes it as chosen.

# %%
choices = ablation.choose_all(records, budgets)
ablation.write_mixed(out, params, choices, checkpoint)
pd.DataFrame(choices).T

# %% [markdown]
# ## Accuracy against size: every configuration tried
# One point per configuration on this split (bars: bootstrap 95%); the grey step line is the Pareto
# front (no other configuration is both smaller and better), the star the choice.

# %%
plots.save(plots.pareto(rows, choices), out / "pareto.png");

# %% [markdown]
# ## The choice on held-out images, against the seeds' heuristics
# A choice made on one split must be checked on another, or it is tuned to noise. Scored on
# `ablation.verify_split`: the choice next to all-quantized, first+last kept, the last quarter of the
# layers kept (the seeds' "late layers matter") and (for 24-layer models) layer 21 kept; then, for each heuristic, the greedy choice given exactly that heuristic's
# memory. `d_top1` and `d_kl` are the greedy configuration minus the other one on the same images,
# with paired bootstrap 95% intervals: an interval that holds 0 is a tie.

# %%
verify_batches = list(ds.loader(verify, params["eval"]["batch_size"]))
checks = runs.kept(run_dir, "ablation", "checks.json", lambda: [
    c for choice in choices.values()
    for c in ablation.check_choice(checkpoint, settings, base_quant, choice, records, verify_batches, device,
                                   params["seed"])])
runs.write_json(runs.path(run_dir, "choice"), {"choices": choices, "verify_split": verify, "checks": checks})
pd.DataFrame(checks).set_index(["quant", "comparison", "config"])[[
    "footprint_mb", "top1", "top1_lo", "top1_hi", "d_top1", "d_top1_lo", "d_top1_hi", "kl", "d_kl", "d_kl_lo",
    "d_kl_hi"]].round(5)

# %%
display(Markdown(f"On the {verify} split ({checks[0]['n']} images):\n\n"
                 + "\n".join(f"- {line}" for line in ablation.verdicts(checks))))

# %% [markdown]
# ## Formats per layer under a latency or accuracy budget
# Size is not speed: bitsandbytes' formats make a model small and slower. vitlab's own formats
# (FP8, W4A8, W3A8, ...) run on its kernels, so the question becomes which layer can run in which
# format. With `ablation.formats` (the menu, e.g. `[16bit, fp8, w4a8]`), each uniform format is timed
# on the run's speed path (`speed`: compiled and CUDA-graphed on a GPU) at `ablation.latency_batch_size`;
# from the fastest one, layers move one at a time to a slower format that holds them better, the move
# with the most of the sweep's KL removed per estimated millisecond first; points along that path are
# built as one model each (`speed.layer_formats`) and measured: top-1 on `ablation.split`, p50 latency
# with CUDA events. `ablation.latency_budget_ms` takes the most accurate within the budget,
# `ablation.max_top1_drop_pt` (or, with neither, no loss at all) the fastest within that accuracy. The
# choice is then checked on `ablation.verify_split` against the uniform formats, the seeds' heuristics and
# the size-budget choice, at every `eval.latency_batch_sizes`, and written as a params file. Every
# build is kept in the step's resume folder: under `vitlab run --time-limit` the study stops before a
# build that would not end in time, and `--resume` continues with the builds it has.

# %%
study = (mixed.study(checkpoint, settings, params, records, batches, verify_batches, device, choices,
                     keep=runs.resume_folder(run_dir, "ablation") / "mixed") if budgets["formats"] else None)
runs.write_json(runs.path(run_dir, "mixed_formats"), study or {"candidates": [], "choice": None, "checks": []})
if study and study["choice"] is None:
    display(Markdown(f"**No mix fits the budget.** {study['no_fit']}"))
elif study:
    mixed.write_params(out, params, study["choice"], checkpoint)
    display(pd.DataFrame(study["candidates"]).set_index("choice")[["p50_ms", "top1", "top1_delta_pt", "kl"]].round(4))
    checked = pd.DataFrame(study["checks"]).assign(model=lambda d: d["choice"])
    for size in params["eval"]["latency_batch_sizes"]:
        plots.save(plots.accuracy_vs_latency(checked, size, front=True), out / f"mixed_formats_bs{size}.png")
    display(Markdown(mixed.verdict(study)))
else:
    display(Markdown("`ablation.formats` is empty: no per-layer format choice was made."))

# %%
runs.close_step(run_dir, "ablation")  # opened by hand: the step is marked finished (under `vitlab run` the runner marks it)

# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Evaluate
# A smaller or faster model is only a win if it keeps its accuracy, so the variant of this run (its
# quantization, run the `speed` way) is measured beside the 16-bit model it came from, on the same
# test images: top-1/top-5/F1 with a bootstrap interval, drift of its logits, size on disk and in
# memory; latency percentiles and throughput over a batch-size sweep; peak GPU memory; and where the
# forward pass spends its time. `vitlab.evaluate` measures one model per row; this notebook shows them.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import data, evaluate, plots, run_models, runs

params, run_dir, out, device = runs.open_step("evaluate", params, run_dir, params_file)
ev = params["eval"]
ds = data.for_checkpoint(params["data"], params["seed"], runs.path(run_dir, "checkpoint"))
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **attention** `{params['model']['attention']}` · "
                 f"**test images** {len(ds.splits.test)} · **models** "
                 + ", ".join(m.label for m in run_models.models_of(run_dir, params))))

# %%
result = evaluate.evaluate_run(run_dir, params, ds, device, out)
result.save(run_dir, {"device": str(device), "attention": params["model"]["attention"], "test_images": len(ds.splits.test)})
result.accuracy.set_index("model").round(4)

# %% [markdown]
# ## Most confused classes (true → predicted)
# Mistakes a quantized model adds show up here as new pairs or larger counts.

# %%
pd.concat({m: pd.DataFrame(p) for m, p in result.confusions.items() if p}, names=["model"]) \
    if any(result.confusions.values()) else "no mistakes"

# %% [markdown]
# The whole confusion matrix of the variant (every cell of every model is in `confusion.csv`):
# errors that concentrate in a few cells are look-alike classes, spread ones are a weak model.

# %%
label, matrix = list(result.matrices.items())[-1]
plots.save(plots.confusion(matrix, f"{label}: confusion on the test split ({len(ds.splits.test)} images)"),
           runs.path(run_dir, "confusion_figure"));

# %% [markdown]
# ## Latency and throughput
# Per batch size: `warmup` untimed forwards, then `iters` timed ones (CUDA events on a GPU,
# perf_counter on the CPU). Throughput is batch size / p50 latency. Quantized kernels pay off at
# some batch sizes and not others, so the sweep, not one number, is the answer.

# %%
result.latency.set_index(["model", "batch_size"])[["mean_ms", "p50_ms", "p95_ms", "p99_ms", "throughput_img_s",
                                                   "peak_mem_mb"]].round(3)

# %%
plots.save(plots.throughput_vs_batch(result.latency), out / "throughput_vs_batch.png");

# %%
merged = result.latency.merge(result.accuracy, on="model")
for bs in sorted({min(ev["latency_batch_sizes"]), max(ev["latency_batch_sizes"])}):
    plots.save(plots.accuracy_vs_latency(merged, bs), out / f"accuracy_vs_latency_bs{bs}.png")

# %%
peak = result.latency.groupby("model")["peak_mem_mb"].max().rename("peak_mem_mb")
plots.save(plots.size_vs_memory(result.accuracy.merge(peak, on="model")), out / "size_vs_memory.png");

# %% [markdown]
# ## Where the time goes
# torch.profiler over the forward pass, per component (device time on a GPU, CPU time otherwise):
# what a speed-up has to attack. `other` is what no component covers (residual adds, reshapes); on a
# GPU a last row gives bitsandbytes' (de)quantisation kernels, already counted inside their component.
# Compiled or graph-replayed models get a table of their GPU kernels instead.

# %%
if not result.profile.empty:
    display(result.profile.pivot_table(index="component", columns="model", values="time_ms", sort=False).round(4))
    plots.save(plots.component_breakdown(result.profile), out / "component_breakdown.png")
for name, table in result.kernels.items():
    display(Markdown(f"**{name}**: top GPU kernels per forward at batch {ev['profile_batch_size']}"), table.round(3))

# %%
runs.close_step(run_dir, "evaluate")  # opened by hand: the step is marked finished (under `vitlab run` the runner marks it)

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
# # 03 · Evaluate
# The 16-bit model and the variant of this run (its quantization, run the `speed` way), side by
# side on the test split:
# top-1/top-5/F1 and the most confused classes; latency (mean, p50, p95, p99) and throughput over a
# batch-size sweep; peak GPU memory; disk size; and a profiler breakdown of the forward pass by
# component. Writes `results.json`, `results.csv`, a profiler trace and figures into `<run>/evaluate/`.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import attention, bench, data, fast, infer, metrics, models, plots, quant, runs

params, run_dir, out, device = runs.open_step("evaluate", params, run_dir, params_file)
ev, attn = params["eval"], params["model"]["attention"]
dtype = models.DTYPES[params["model"]["dtype"]]
attention.check_supported(attn, device, dtype)
ds = data.for_checkpoint(params["data"], params["seed"], run_dir / "finetune" / "model")
speed = params["speed"]
candidates = {f"16-bit ({params['model']['dtype']})": (run_dir / "finetune" / "model", False)}
if params["quant"]["bits"] != 16 or fast.is_active(speed):
    label = quant.describe(params["quant"]) if params["quant"]["bits"] != 16 else params["model"]["dtype"]
    label += f" + {fast.describe(speed)}" if fast.is_active(speed) else ""
    candidates[label] = (run_dir / "quantize" / "model", fast.is_active(speed))
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **attention** `{attn}` · "
                 f"**test images** {len(ds.splits.test)} · **models** {', '.join(candidates)}"))

# %%
accuracy, confusions, latency, profiles, kernels = [], {}, [], [], {}
for name, (path, sped) in candidates.items():
    model = models.load_checkpoint(path, dtype, attn, device)
    model = fast.apply(model, speed, attn) if sped else model
    logits, labels = infer.predict(model, ds.loader("test", ev["batch_size"]), device, attn, desc=name)
    scores = metrics.classification(logits, labels, len(ds.class_names))
    lo, hi = metrics.bootstrap_ci(logits.argmax(1) == labels, seed=params["seed"])
    # torchao changes the weights here, so size them as saved now; otherwise the saved folder is the artifact.
    disk = fast.storage_bytes(model) if sped and speed["torchao"] != "none" else quant.dir_bytes(path)
    accuracy.append({"model": name, **scores, "top1_lo": lo, "top1_hi": hi, "disk_mb": disk / 2**20,
                     # torchao tensors report their outer dtype's element size: no honest footprint from them.
                     "footprint_mb": None if sped and speed["torchao"] != "none"
                     else models.parameter_bytes(fast.unwrapped(model)) / 2**20})
    confusions[name] = metrics.confused_pairs(labels, logits.argmax(1), ds.class_names)
    latency += bench.latency_sweep(model, ev["latency_batch_sizes"], ds.image_size, device, ev["warmup"],
                                   ev["iters"], attn, labels={"model": name})
    # Module hooks cannot see inside a compiled or graph-replayed forward: those get a kernel table.
    if ev["profile"] and sped and device.type == "cuda":
        with attention.kernel(attn):
            kernels[name] = bench.kernel_table(model, bench.random_batch(model, ev["profile_batch_size"], ds.image_size, device))
    elif ev["profile"] and not sped:
        x = bench.random_batch(model, ev["profile_batch_size"], ds.image_size, device)
        trace = out / f"trace_{len(profiles)}.json" if device.type == "cuda" else None
        table = bench.profile_components(model, x, ev["profile_iters"], attn, trace)
        profiles.append(table.assign(model=name, forward_ms=table.attrs["forward_ms"], clock=table.attrs["clock"]))
    del model

accuracy = pd.DataFrame(accuracy)
latency = pd.DataFrame(latency)
accuracy.set_index("model").round(4)

# %% [markdown]
# ## Most confused classes (true → predicted)

# %%
pd.concat({m: pd.DataFrame(p) for m, p in confusions.items() if p}, names=["model"]) if any(confusions.values()) else "no mistakes"

# %% [markdown]
# ## Latency and throughput
# Per batch size: `warmup` untimed forwards, then `iters` timed ones (CUDA events on a GPU,
# perf_counter on the CPU). Throughput is batch size / p50 latency.

# %%
latency.set_index(["model", "batch_size"])[["mean_ms", "p50_ms", "p95_ms", "p99_ms", "throughput_img_s", "peak_mem_mb"]].round(3)

# %%
plots.save(plots.throughput_vs_batch(latency), out / "throughput_vs_batch.png");

# %%
merged = latency.merge(accuracy, on="model")
for bs in sorted({min(ev["latency_batch_sizes"]), max(ev["latency_batch_sizes"])}):
    plots.save(plots.accuracy_vs_latency(merged, bs), out / f"accuracy_vs_latency_bs{bs}.png")

# %%
peak = latency.groupby("model")["peak_mem_mb"].max().rename("peak_mem_mb")
plots.save(plots.size_vs_memory(accuracy.merge(peak, on="model")), out / "size_vs_memory.png");

# %% [markdown]
# ## Where the time goes
# torch.profiler over the forward pass, per component (device time on a GPU, CPU time otherwise).
# `other` is what no component covers (residual adds, reshapes); on a GPU a last row gives
# bitsandbytes' (de)quantisation kernels, already counted inside their component.

# %%
if profiles:
    profile = pd.concat(profiles, ignore_index=True)
    profile.attrs["clock"] = profile["clock"].iloc[0]
    display(profile.pivot_table(index="component", columns="model", values="time_ms", sort=False).round(4))
    plots.save(plots.component_breakdown(profile), out / "component_breakdown.png")
else:
    profile = pd.DataFrame()
for name, table in kernels.items():
    display(Markdown(f"**{name}**: top GPU kernels per forward at batch {ev['profile_batch_size']}"), table.round(3))

# %%
results = {"device": str(device), "attention": attn, "test_images": len(ds.splits.test),
           "accuracy": accuracy.to_dict("records"), "confusions": confusions,
           "latency": latency.to_dict("records"), "profile": profile.to_dict("records"),
           "kernels": {name: table.to_dict("records") for name, table in kernels.items()}}
merged.to_csv(out / "results.csv", index=False)
runs.write_json(out / "results.json", results)

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
# # 01 · Fine-tune
# Train a ViT classifier: LoRA or QLoRA adapters on a pretrained checkpoint, or every weight
# (`finetune.method: full`, the offline default, which starts from a random init). Writes the
# adapter, a merged 16-bit checkpoint (safetensors + image processor), the training curves and
# `metrics.json` into `<run>/finetune/`.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import data, finetune, models, plots, runs

params, run_dir, out, device = runs.open_step("finetune", params, run_dir, params_file)
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **method** `{params['finetune']['method']}` "
                 f"· **model** `{params['model']['id'] or 'random init from model.config'}`"))

# %% [markdown]
# ## Data

# %%
processor = models.load_processor(params["model"])
ds = data.for_model(params["data"], params["seed"], processor)
pd.DataFrame({"images": {s: len(ds.splits[s]) for s in data.SPLITS}}).T.assign(
    classes=len(ds.class_names), image_size=ds.image_size)

# %% [markdown]
# ## Model

# %%
model = finetune.build(params["model"], params["finetune"], ds.class_names, device)
trainable, total = finetune.trainable_parameters(model)
print(f"{type(model).__name__}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

# %% [markdown]
# ## Training

# %%
ft = params["finetune"]
history = finetune.train(model, ds.loader("train", ft["batch_size"]), ds.loader("valid", ft["batch_size"]),
                         ft, device, params["model"]["attention"])
pd.DataFrame(history).set_index("epoch").round(4)

# %%
fig = plots.training_curves(history)
plots.save(fig, out / "training_curves.png")

# %% [markdown]
# ## Save: adapter, merged 16-bit checkpoint, metrics

# %%
finetune.save(model, processor, params["model"], ds.class_names, ft["method"], out)
runs.write_json(out / "metrics.json", {
    "method": ft["method"], "trainable_params": trainable, "total_params": total,
    "class_names": ds.class_names, "history": history,
    "final": {k: history[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
})
sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Fine-tune
# Every later step compares against the model this step makes, so it is trained once and saved as
# a plain 16-bit checkpoint. LoRA or QLoRA adapt a pretrained checkpoint through small adapters
# (QLoRA on a 4-bit base, to fit a large model in little memory); `finetune.method: full` trains
# every weight (the offline default, which starts from a random init); `probe` trains the classifier
# alone, and `none` takes `model.id` as it is (to quantize and evaluate a model you already have).
# A checkpoint's classifier is kept only when its labels are this data's; otherwise the head starts
# fresh, which makes a model pretrained on some classes a transfer problem on others. The adapters
# are merged into the weights, so quantization and evaluation see an ordinary ViT.

# %% tags=["parameters"]
params_file = "params/offline.yaml"  # read when the notebook is opened by hand
params = None  # `vitlab run` injects the resolved parameters...
run_dir = None  # ...and the run folder

# %%
import pandas as pd
from IPython.display import Markdown, display

from vitlab import data, finetune, models, plots, runs

params, run_dir, out, device = runs.open_step("finetune", params, run_dir, params_file)
settings = models.ModelSettings.from_params(params["model"])
ft = params["finetune"]
display(Markdown(f"**run** `{run_dir.name}` · **device** `{device}` · **method** `{ft['method']}` "
                 f"· **model** `{settings.id or 'random init from model.config'}` · **attention** `{settings.attention}`"))

# %% [markdown]
# ## Data
# The image processor of the model fixes the input size and normalisation; training images are
# augmented (random resized crops, flips), validation and test images only resized and centre-cropped.

# %%
processor = models.load_processor(settings)
ds = data.for_model(params["data"], params["seed"], processor)
pd.DataFrame({"images": {s: len(ds.splits[s]) for s in data.SPLITS}}).T.assign(
    classes=len(ds.class_names), image_size=ds.image_size)

# %% [markdown]
# ## Model
# How many weights are trained is the main cost of a method: LoRA trains a few percent.

# %%
model = finetune.build(settings, ft, ds.class_names, device)
trainable, total = finetune.trainable_parameters(model)
print(f"{type(model).__name__}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

# %% [markdown]
# ## Training
# AdamW with linear warm-up and cosine decay, bf16 autocast on GPUs that have it; the validation
# split is scored after every epoch, to see over- or under-fitting in the curves. With
# `data.pipeline: gpu` the images are decoded once and augmented on the device, so a small ViT is
# not left waiting for CPU workers; `train_img_s` shows what each epoch got. With
# `data.train_image_size`, most epochs train on smaller crops (fewer tokens per image, so more epochs
# in the same time) and the last `finetune.full_size_epochs` at the model's size. The state after each
# epoch is kept, so `vitlab run --resume` of a stopped run continues where it stopped. With
# `finetune.processes` > 1 the training runs in that many data-parallel processes (DDP through
# accelerate, one GPU each), each on its share of every batch, and the main one saves the model.

# %%
history = finetune.run(model, ds, processor, params, device, out, runs.resume_folder(run_dir, "finetune") / "last.pt")
pd.DataFrame(history).set_index("epoch").round(4) if history else Markdown("`finetune.method: none`: nothing trained.")

# %%
if history:
    plots.save(plots.training_curves(history), runs.path(run_dir, "training_curves"))

# %% [markdown]
# ## Saved: adapter, merged 16-bit checkpoint, metrics
# The merged checkpoint (safetensors + image processor) loads like a hub model: `model.id: <its path>`.

# %%
runs.write_json(runs.path(run_dir, "train_metrics"),
                finetune.metrics(ft["method"], (trainable, total), ds.class_names, history))
sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

# %%
runs.close_step(run_dir, "finetune")  # opened by hand: the step is marked finished (under `vitlab run` the runner marks it)

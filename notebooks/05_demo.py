# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Demo
# Numbers in a table are one thing; seeing a model name the flower in your own photo, and how long
# it took, is another. Pick a run and one of its models (16-bit or the quantized / sped-up variant),
# then upload an image or pick one from the test split: the top-5 classes appear with their
# probabilities and the latency of that prediction. Open this notebook in JupyterLab and run all cells.

# %% tags=["parameters"]
params = None  # under `vitlab run`: the run's params (its `device` is used)
run_dir = None  # the run to show first; None: every finished run under runs/

# %%
from pathlib import Path

from IPython.display import HTML, Markdown, display

from vitlab import demo, machine, runs
from vitlab.errors import DataError

runs_root = Path(run_dir).parent if run_dir else runs.RUNS_DIR
device = machine.resolve_device(params["device"] if params else "auto")
ui = demo.app(runs_root, device, first=Path(run_dir) if run_dir else None)
ui

# %% [markdown]
# The same predictions without the widget, for the first test image of the newest run, per model
# (this is what the executed notebook shows when the demo runs headless):

# %%
finished = demo.finished_runs(runs_root)
try:
    samples = demo.test_images(finished[0], n=1) if finished else []
except DataError as e:  # a run folder from another machine: its photos stayed there, the widget takes uploads
    samples = []
    display(Markdown(f"_{e}_"))
predictor = demo.Predictor(device)
for label, image in samples:
    for variant in demo.variants(finished[0]):
        top, ms = predictor.predict(finished[0], variant, image)
        display(HTML(demo.result_html(top, ms, variant, f"test image {label}", predictor.where)))

"""vitlab: make Vision Transformers small and fast without losing accuracy.

Modules, one job each, bottom to top (docs/running.md has the table): errors, settings (typed params,
no torch), config (YAML), fmt, attention, machine, runs (the run contract), runner (executing it),
images, gpu_data, data, models, quant, kernels and lowbit (vitlab's FP8/int4), speed, parallel, training
(the loop) and finetune (what trains, how it is saved), infer, metrics, bench, run_models, evaluate,
ablation, plots, report, demo.
"""
__version__ = "0.1.0"

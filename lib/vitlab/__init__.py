"""vitlab: make Vision Transformers small and fast without losing accuracy.

Modules, one job each: config (params), data, models, attention, finetune, quant, infer, metrics,
bench, ablation, runs (run folders + papermill), plots, report, demo.
"""
__version__ = "0.1.0"

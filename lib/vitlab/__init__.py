"""vitlab: make Vision Transformers small and fast without losing accuracy.

Modules, one job each: config (params), data, models (settings, loading, parts, sizes), attention
(kernels, set on the model), finetune, quant, speed (CUDA graphs, compile, torchao), infer, metrics,
bench (latency, profiles), evaluate (one model -> one row; a run's evaluation), ablation, runs (the
run-folder contract, manifest, papermill), plots, report (cross-run tables and HTML), demo.
"""
__version__ = "0.1.0"

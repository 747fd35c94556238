"""vitlab: make Vision Transformers small and fast without losing accuracy.

Modules, one job each, bottom to top (docs/running.md has the table): errors, settings (typed params,
no torch), config (YAML), fmt, attention, machine, runs (the run contract), runner (executing it),
images, gpu_data, data, models, quant, kernels and lowbit (vitlab's FP8/int4), speed, parallel, training
(the loop) and finetune (what trains, how it is saved), infer, metrics, bench, run_models, evaluate,
ablation, plots, report, demo.
"""
__version__ = "0.1.0"

import logging as _logging


def _drop_torchao_enum_notice(record: _logging.LogRecord) -> bool:
    # transformers imports torchao whenever it is installed, and torchao 0.18 registers two Enums with torch's
    # pytree, which torch 2.14 (the CPU machines') answers with a deprecation warning on every import: in every notebook's output
    # and report, about nothing vitlab or its user can change.
    return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()


_logging.getLogger("torch.utils._pytree").addFilter(_drop_torchao_enum_notice)

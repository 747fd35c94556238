"""vitlab's benchmarks, one entry point: `python benchmarks/run.py NAME [ARGS ...]` from anywhere.

    python benchmarks/run.py                      # the benchmarks, one line each
    python benchmarks/run.py peers --help         # one benchmark's flags
    python benchmarks/run.py peers speed --paths stock,vitlab_fp8_triton --out /tmp/peers

Each NAME is benchmarks/NAME.py (every one has `main(argv)` and the flags --out, --device, --tag).
Results live in benchmarks/results/ as `<bench>_<device>[_<part>][_<tag>].json` (peers_h200.json,
speed_paths_h100_a.json, ...), each `{meta, rows}`: meta holds the command, arguments, git commit,
versions and device; rows are flat, and a file of several tables marks the rows of all but the main
one with `table` (common.by_table splits them). train_speed_* and evaluate_*_offline hold `vitlab run`
products (meta.command says which). Explorations that led nowhere sit in results/explore/. `summarize`
turns them into docs/results.md, the README's headline table and figures/ (the one writer there).
Timings are measured here, never in tests.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run", "common"}


def benchmarks() -> dict[str, str]:
    """NAME -> the first line of its docstring."""
    out = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem not in NOT_BENCHMARKS:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def main(argv: list[str]) -> int:
    known = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip().splitlines()[0] + "\n")
        width = max(map(len, known))
        print("\n".join(f"  {name:<{width}}  {line}" for name, line in known.items()))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in known:
        print(f"run.py: no benchmark '{name}'; choose one of {', '.join(known)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))  # the scripts share common.py
    sys.argv = [f"benchmarks/run.py {name}", *rest]
    importlib.import_module(name).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

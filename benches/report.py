#!/usr/bin/env python3
"""Print criterion results as ratio tables: each benchmark's median time divided by its
group's baseline for the same parameter (bare-gemm, rw-pass, scalar or naive), all from the
last `cargo bench` run (under $CARGO_TARGET_DIR if set). Usage: python3 benches/report.py [group-prefix ...]"""
import json
import os
import pathlib
import sys

BASELINES = ["bare-gemm", "rw-pass", "scalar", "naive", "blas-gemm"]
target = os.environ.get("CARGO_TARGET_DIR") or pathlib.Path(__file__).resolve().parent.parent / "target"
root = pathlib.Path(target) / "criterion"
prefixes = sys.argv[1:]


def median_ns(path):
    return json.loads((path / "new" / "estimates.json").read_text())["median"]["point_estimate"]


for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report"):
    if prefixes and not any(group.name.startswith(p) for p in prefixes):
        continue
    rows = {}  # param -> {function: ns}
    for func in sorted(p for p in group.iterdir() if p.is_dir() and p.name != "report"):
        if (func / "new").exists():
            rows.setdefault("-", {})[func.name] = median_ns(func)
        for param in (p for p in func.iterdir() if (p / "new").exists()):
            rows.setdefault(param.name, {})[func.name] = median_ns(param)
    print(f"\n{group.name}")
    for param in sorted(rows, key=lambda p: (len(p), p)):
        times = rows[param]
        base = next((b for b in BASELINES if b in times), None)
        cells = []
        for name, ns in sorted(times.items()):
            ratio = f" ({ns / times[base]:.2f}x)" if base and name != base else ""
            unit, div = ("ms", 1e6) if ns >= 1e6 else ("µs", 1e3) if ns >= 1e3 else ("ns", 1)
            cells.append(f"{name} {ns / div:.3g} {unit}{ratio}")
        print(f"  {param:>6}: " + ", ".join(cells))

"""`make bench`: every benchmark of the project in one run, written as markdown and JSON with the machine.

Each ``benchmarks/bench_<name>.py`` that exposes ``run(quick: bool) -> dict`` of figures (each compares against a
reference measured in the same run), and ``benchmarks/attacks.py`` (the adversarial harness's table of attacks and
the figure "attacks tried / refused"), is part of it; one without (``bench_gpu.py``, which needs CUDA) is a script
run by hand, skipped with a note. Results go to ``benchmarks/results/results.{md,json}``; a benchmark that
fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from medsyngan.rundir import atomic_write_text  # noqa: E402


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def discover(only: list[str] | None) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py")) + [HERE / "attacks.py"]  # the adversarial harness's table
    if only:
        found = [p for p in found if p.stem.removeprefix("bench_") in only]
    return found


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def markdown(results: dict) -> str:
    lines = ["# Benchmark results", "", f"Run {results['date']} ({'quick' if results['quick'] else 'full'})", "",
             "| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    for name, entry in results["benchmarks"].items():
        lines += ["", f"## {name}", "", f"{entry['seconds']:.0f} s", ""]
        if "error" in entry:
            lines.append(f"**failed:** `{entry['error']}`")
            continue
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in entry["figures"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short versions of every benchmark")
    parser.add_argument("--only", nargs="*", help="names to run (data, training, dp, ...)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for results.md / results.json")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "machine": machine(),
               "benchmarks": {}}
    failed = 0
    for path in discover(args.only):
        name = path.stem.removeprefix("bench_")
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            module = load(path)
            if not hasattr(module, "run"):
                print("   a script run by hand (no run(quick)); see its docstring", flush=True)
                continue
            figures = module.run(args.quick)
            results["benchmarks"][name] = {"figures": figures, "seconds": time.perf_counter() - start}
            for key, value in figures.items():
                print(f"   {key}: {value}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            failed += 1
            traceback.print_exc()
            results["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    atomic_write_text(args.out / f"results{suffix}.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(args.out / f"results{suffix}.md", markdown(results))
    print(f"wrote {args.out / f'results{suffix}.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

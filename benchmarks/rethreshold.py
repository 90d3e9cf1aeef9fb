"""How long ``diffusion-anomaly rethreshold`` takes on a demo result: wall time of the command, and where it goes.

    python benchmarks/rethreshold.py --result DEMO_DIR        # a folder 'diffusion-anomaly demo' wrote
    python benchmarks/rethreshold.py                          # makes one first (the demo, a few minutes)

The result is copied to a temporary folder (re-thresholding rewrites its files), then:

1. wall time of the command as a user types it (``diffusion-anomaly rethreshold --result COPY
   --threshold-absolute 2``, output discarded), ``--runs`` times after one warm-up run: median, min, max;
   once as this environment runs Python, and once with the package's compiled bytecode cached (in a
   temporary ``PYTHONPYCACHEPREFIX``), as an installed package runs where ``PYTHONDONTWRITEBYTECODE`` is
   not set;
2. the split of one run, ``--runs`` times (medians): interpreter start, importing the command, then the
   command's stages (each function timed where the command calls it, nested stages indented) and the
   packages first imported inside the command (``-X importtime``, which slows those runs a little).

A benchmark, not a test: it prints numbers and asserts nothing. Times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the stages of the split: (name, the function timed as ``module.attribute`` of DiffusionAnomalyLib, parent stage)
STAGES = (
    ("read scan and heat map", "cli.read_volume", None),
    ("read organ map", "cli.read_organ_labels", None),
    ("model card", "cli.read_card", None),
    ("organ ROI", "roi.OrganSelection.mask", None),
    ("lesions, table, reference region", "pipeline.CaseResult.threshold", None),
    ("write the result files", "cli.write_outputs", None),
    ("lesions.seg.nrrd", "pipeline.write_segmentation", "write the result files"),
    ("lesions.csv", "pipeline.write_table_csv", "write the result files"),
    ("report.html", "cli.write_report", "write the result files"),
    ("figure set-up", "figures.CaseFigures.__init__", "report.html"),
    ("coronal MIP", "figures.CaseFigures.coronal", "report.html"),
    ("key images", "figures.CaseFigures.key_image", "report.html"),
    ("summary.json", "pipeline.write_json", "write the result files"),
)

#: what the instrumented run executes: ``argv[1]`` = where to write the timings, ``argv[2:]`` = the command's
_PROBE = r"""
import json, sys, time
entered = time.time()
t0 = time.perf_counter()
import DiffusionAnomalyLib.cli as cli
imported = time.perf_counter() - t0
import functools, importlib
spent, calls = {}, {}
def timed(name, function):
    @functools.wraps(function)
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            calls[name] = calls.get(name, 0) + 1
    return run
for name, path, _ in STAGES:
    module, *parents, attribute = path.split(".")
    owner = importlib.import_module("DiffusionAnomalyLib." + module)
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, attribute, timed(name, getattr(owner, attribute)))
print("--- command starts", file=sys.stderr, flush=True)
t0 = time.perf_counter()
code = cli.main(sys.argv[2:])
command = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"entered": entered, "import": imported, "command": command, "spent": spent, "calls": calls,
               "code": code}, f)
"""


def _command() -> list[str]:
    """The command as a user runs it: the ``diffusion-anomaly`` on PATH (else this Python's ``-m`` of the CLI)."""
    found = shutil.which("diffusion-anomaly")
    return [found] if found else [sys.executable, "-m", "DiffusionAnomalyLib.cli"]


def _wall(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the command failed ({done.returncode}): {done.stderr.strip()}")
    return seconds


def _split(options: list[str], folder: Path, env: dict[str, str]) -> dict:
    """One instrumented run: start-up, import, command and its stages (seconds), packages imported inside it."""
    record = folder.parent / "split.json"
    code = f"STAGES = {STAGES!r}\n{_PROBE}"
    started = time.time()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, str(record), "rethreshold", "--result",
                           str(folder), *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, cwd=folder.parent)  # not the current folder: the package as installed
    if done.returncode != 0:
        raise SystemExit(f"the instrumented run failed: {done.stderr.strip()[-2000:]}")
    split = json.loads(record.read_text())
    split["start-up"] = split.pop("entered") - started
    imports: dict[str, float] = {}
    inside = done.stderr.split("--- command starts", 1)[1]
    for line in inside.splitlines():  # "import time: self [us] | cumulative | name", nesting by indentation
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if not name.startswith("  ") and name.strip() != "imported package":
                top = name.strip().split(".")[0]
                imports[top] = imports.get(top, 0.0) + int(cumulative) / 1e6
    split["imports"] = imports
    return split


def _median_split(splits: list[dict]) -> dict:
    def med(values):
        return statistics.median(values) if values else 0.0

    names = [s[0] for s in STAGES]
    packages = sorted({p for s in splits for p in s["imports"]})
    return {
        "start-up": med([s["start-up"] for s in splits]),
        "import": med([s["import"] for s in splits]),
        "command": med([s["command"] for s in splits]),
        "stages": {n: med([s["spent"].get(n, 0.0) for s in splits]) for n in names},
        "calls": {n: max(s["calls"].get(n, 0) for s in splits) for n in names},
        "imports": {p: med([s["imports"].get(p, 0.0) for s in splits]) for p in packages},
    }


def _make_demo(where: Path) -> Path:
    out = where / "demo"
    print(f"making a demo result in {out} (diffusion-anomaly demo, a few minutes) ...", flush=True)
    subprocess.run([*_command(), "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", type=Path, default=None, help="a demo (or run) result folder; default: make one")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per row (after one warm-up run)")
    parser.add_argument("--threshold-absolute", default="2", help="the re-threshold's cut-off (heat-map units)")
    args = parser.parse_args(argv)
    options = ["--threshold-absolute", str(args.threshold_absolute)]
    with tempfile.TemporaryDirectory(prefix="rethreshold-benchmark-") as work:
        work = Path(work)
        source = args.result or _make_demo(work)
        folder = work / "result"
        shutil.copytree(source, folder)
        command = [*_command(), "rethreshold", "--result", str(folder), *options]
        cached = {**os.environ, "PYTHONPYCACHEPREFIX": str(work / "pycache")}
        cached.pop("PYTHONDONTWRITEBYTECODE", None)
        print(f"command: {' '.join(command[:1] + ['rethreshold', '--result', '<copy of ' + str(source) + '>'] + options)}")
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
              f"{args.runs} runs per row after a warm-up run")
        for label, env in (("as this environment runs it", dict(os.environ)),
                           ("bytecode cached (installed package)", cached)):
            _wall(command, env, work)  # warm-up: file cache, and the bytecode cache of the second row
            times = [_wall(command, env, work) for _ in range(args.runs)]
            print(f"wall, {label:37s} median {statistics.median(times):.2f} s, min {min(times):.2f} s, "
                  f"max {max(times):.2f} s")
        split = _median_split([_split(options, folder, cached) for _ in range(args.runs)])
    print(f"\nsplit of one run (medians of {args.runs}; bytecode cached; under -X importtime):")
    print(f"  {'interpreter start-up':36s}{split['start-up']:.3f} s")
    print(f"  {'import DiffusionAnomalyLib.cli':36s}{split['import']:.3f} s")
    print(f"  {'the command':36s}{split['command']:.3f} s, of which:")
    top = 0.0
    depth = {None: 0}
    for name, _, parent in STAGES:
        depth[name] = depth[parent] + 1
        seconds = split["stages"][name]
        calls = split["calls"][name]
        top += seconds if parent is None else 0.0
        print(f"  {'  ' * depth[name]}{name:{36 - 2 * depth[name]}s}{seconds:.3f} s"
              + (f" ({calls} calls)" if calls > 1 else ""))
    print(f"    {'other (checks, printing, ...)':34s}{split['command'] - top:.3f} s")
    shown = {p: s for p, s in split["imports"].items() if s >= 0.005}
    print("  packages first imported inside the command (included above): "
          + (", ".join(f"{p} {s:.3f} s" for p, s in sorted(shown.items(), key=lambda kv: -kv[1])) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

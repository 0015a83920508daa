"""How the pipeline's cost grows with the number of images: `python -m benchmarks.scaling [--sizes N ...]`.

For each N (default 3,000, 12,000 and 30,000) it builds a dataset from the shared zip, laid out like it
(train/ and validation/ per class): every photo once as it is, then variants of it, each a seeded random
crop (80-100% of each side), mirror and colour jitter (brightness, contrast, saturation) saved as JPEG, so
that no two files are byte-identical, and each variant stays in its photo's split. It is built in a
temporary folder at run time, never committed.

A throwaway project (tests.helpers.make_project) with MobileNetV2 and the shared ImageNet weights then runs
`dvc repro` up to `evaluate@mobilenet` and `audit`: validate, fetch (from a file:// URL), prepare,
features, train, evaluate, crossval and audit. Each stage's command runs under a small wrapper that records
its wall time and its peak RSS (VmHWM, read by the stage's own process as it exits). DVC's own overhead is
the `dvc repro` time outside the stage commands. Then a no-op `dvc status` and `dvc repro` are timed.

It writes benchmarks/scaling.json and benchmarks/scaling.png (time and peak RSS against N), checks the targets
(t(largest)/t(smallest) at most 1.1 times the images' ratio: linear or better; every stage's peak RSS at most
4 GB; a no-op `dvc repro` under 10 s), and renders its table into docs/performance.md (the `scaling` markers).
scaling.json keeps, under `before_fixes`, the run before the stages depended on prepare's manifest instead of
its folder and before fetch skipped an unchanged local archive.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import RESULTS, Block, benchmark_parser, load_results, measured, publish, save_results, stamp
from tests.helpers import SHARED_DIR, make_project, run

NAME = "scaling"
PAGE = "docs/performance.md"
CHART = RESULTS / "scaling.png"

WEIGHTS = "weights/mobilenet_v2_1.0_224_imagenet_notop.weights.h5"
STAGES = ("validate", "fetch", "prepare", "features", "train", "evaluate", "crossval", "audit")
MAX_RSS_MB = 4000
MAX_NOOP_REPRO_S = 10.0

# Runs one stage command and appends {stage, seconds, peak_rss_mb} to the log named first: the command's own
# process reports its VmHWM as it exits (a child's ru_maxrss would also count the memory of its parent).
WRAPPER = """
import json, subprocess, sys, time
log, command = sys.argv[1], sys.argv[2:]
report = (
    "import atexit, runpy, sys; "
    "hwm, module = sys.argv.pop(1), sys.argv.pop(1); "
    "atexit.register(lambda: open(hwm, 'w').write(next("
    "l for l in open('/proc/self/status') if l.startswith('VmHWM')))); "
    "sys.argv[0] = module; runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
started = time.perf_counter()
hwm = log + ".hwm"
code = subprocess.call([sys.executable, "-c", report, hwm, *command[2:]])
seconds = time.perf_counter() - started
peak = int(open(hwm).read().split()[1]) // 1024
with open(log, "a") as out:
    out.write(json.dumps({"stage": command[2].removeprefix("stages."), "seconds": seconds, "peak_rss_mb": peak}) + "\\n")
sys.exit(code)
"""


def variant(data: bytes, seed: int) -> bytes:
    """A seeded random crop, mirror and colour jitter of a JPEG photo, as a new JPEG."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    w, h = int(width * rng.uniform(0.8, 1.0)), int(height * rng.uniform(0.8, 1.0))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = image.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.8, 1.2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def variants(job: tuple[str, bytes, int, int]) -> list[tuple[str, bytes]]:
    name, data, first, count = job
    stem, suffix = name.rsplit(".", 1)
    return [
        (f"{stem}.v{k}.{suffix}", variant(data, zlib.crc32(f"{stem}/{k}".encode())))
        for k in range(first, first + count)
    ]


def build_dataset(shared: Path, n: int, path: Path) -> dict[str, int]:
    """The shared photos plus variants up to `n` images, as a zip laid out like the shared one."""
    with zipfile.ZipFile(shared / "data" / "cats_and_dogs_filtered.zip") as archive:
        photos = [(name, archive.read(name)) for name in sorted(archive.namelist()) if name.endswith(".jpg")]
    if n < len(photos):  # every split and class still represented
        photos = [photos[int(i * len(photos) / n)] for i in range(n)]
    extra = max(0, n - len(photos))
    jobs = [(name, data, 1, extra // len(photos) + (i < extra % len(photos))) for i, (name, data) in enumerate(photos)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out, ProcessPoolExecutor(os.cpu_count()) as pool:
        for name, data in photos:
            out.writestr(name, data)
        for made in pool.map(variants, [job for job in jobs if job[3]], chunksize=16):
            for name, data in made:
                out.writestr(name, data)
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith(".jpg")]
    return {"images": len(names), "zip_bytes": path.stat().st_size}


def with_wrapper(project: Path, wrapper: Path, log: Path) -> None:
    """Every stage command of the project's dvc.yaml run under the wrapper (python -m stages.X -> wrapped)."""
    path = project / "dvc.yaml"
    text = path.read_text().replace("cmd: python -m stages.", f"cmd: python {wrapper} {log} python -m stages.")
    path.write_text(text)
    run(["git", "commit", "-qam", "timed stages"], project)


def timed(args: list[str], cwd: Path, timeout: float = 7200) -> float:
    started = time.perf_counter()
    run(args, cwd, timeout=timeout)
    return time.perf_counter() - started


def measure(shared: Path, n: int, folder: Path) -> dict[str, Any]:
    folder.mkdir()
    started = time.perf_counter()
    dataset = build_dataset(shared, n, folder / "dataset.zip")
    print(f"{n}: dataset of {dataset['images']} images built in {time.perf_counter() - started:.0f} s", flush=True)
    backbone = {"mobilenet": {"arch": "MobileNetV2", "image_size": 224, "weights": str(shared / WEIGHTS)}}
    project = make_project(
        folder / "project",
        {"data": {"url": (folder / "dataset.zip").as_uri()}, "backbones": backbone, "model": "mobilenet"},
    )
    wrapper, log = folder / "timed.py", folder / "stages.jsonl"
    wrapper.write_text(WRAPPER)
    with_wrapper(project, wrapper, log)
    repro_s = timed([sys.executable, "-m", "dvc", "repro", "evaluate@mobilenet", "audit"], project)
    stages = [json.loads(line) for line in log.read_text().splitlines()]
    status_s = timed([sys.executable, "-m", "dvc", "status"], project)
    noop_s = timed([sys.executable, "-m", "dvc", "repro", "evaluate@mobilenet", "audit"], project)
    result = {
        "images": dataset["images"],
        "zip_mb": round(dataset["zip_bytes"] / 1e6),
        "stages": {s["stage"]: {"seconds": round(s["seconds"], 1), "peak_rss_mb": s["peak_rss_mb"]} for s in stages},
        "dvc_repro_s": round(repro_s, 1),
        "dvc_overhead_s": round(repro_s - sum(s["seconds"] for s in stages), 1),
        "noop_status_s": round(status_s, 1),
        "noop_repro_s": round(noop_s, 1),
    }
    print(json.dumps(result), flush=True)
    shutil.rmtree(folder)  # gigabytes of images and cache
    return result


def rows(results: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of `results`: per N, each stage's wall time and peak RSS, DVC's overhead and no-ops."""
    lines = [
        "| images | archive | " + " | ".join(STAGES) + " | DVC overhead | no-op `dvc status` | no-op `dvc repro` |",
        "|---:|---:|" + "---:|" * (len(STAGES) + 3),
    ]
    for r in results:
        cells = [
            f"{r['stages'][s]['seconds']} s, {r['stages'][s]['peak_rss_mb']} MB" if s in r["stages"] else "–"
            for s in STAGES
        ]
        lines.append(
            f"| {r['images']:,} | {r['zip_mb']} MB | "
            + " | ".join(cells)
            + f" | {r['dvc_overhead_s']} s | {r['noop_status_s']} s | {r['noop_repro_s']} s |"
        )
    return lines


def growth(results: list[dict[str, Any]]) -> str:
    """How much each stage's time grew from the smallest N to the largest, slowest-growing last."""
    small, large = results[0], results[-1]
    ratios = {s: large["stages"][s]["seconds"] / max(small["stages"][s]["seconds"], 1e-9) for s in STAGES}
    shown = ", ".join(f"{s} {r:.1f}x" for s, r in sorted(ratios.items(), key=lambda item: -item[1]) if s != "validate")
    return (
        f"From {small['images']:,} to {large['images']:,} images ({large['images'] / small['images']:.0f}x the images, "
        f"{large['zip_mb'] / small['zip_mb']:.1f}x the archive's bytes) each stage's time grew: {shown}; DVC's "
        f"overhead {large['dvc_overhead_s'] / small['dvc_overhead_s']:.1f}x. The largest peak RSS was "
        f"{max(s['peak_rss_mb'] for r in results for s in r['stages'].values()):,} MB."
    )


def table(report: dict[str, Any]) -> str:
    missed = targets(report["runs"])
    lines = [
        f"{measured(report, NAME)} (`--sizes {' '.join(str(r['images']) for r in report['runs'])}`): each cell is wall "
        "time and peak RSS.",
        "",
        *rows(report["runs"]),
        "",
        growth(report["runs"]),
        "",
        "Targets: " + ("all met." if not missed else "; ".join(missed) + "."),
    ]
    before = report.get("before_fixes")
    if before:
        lines += [
            "",
            f"Before the two fixes (measured on {before['machine']}, {before['date']}; its extraction was slower, "
            "so only DVC's columns and the ratios compare):",
            "",
            *rows(before["runs"]),
        ]
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(PAGE, NAME): table(report)}


def targets(results: list[dict[str, Any]]) -> list[str]:
    """One line per target missed (empty: all met)."""
    small, large = results[0], results[-1]
    allowed = 1.1 * large["images"] / small["images"]  # 11 for 3,000 -> 30,000
    missed = []
    for stage in STAGES:
        ratio = large["stages"][stage]["seconds"] / max(small["stages"][stage]["seconds"], 1e-9)
        if ratio > allowed:
            missed.append(f"{stage}: {ratio:.1f}x the time for {large['images'] / small['images']:.0f}x the images")
    for r in results:
        for stage, s in r["stages"].items():
            if s["peak_rss_mb"] and s["peak_rss_mb"] > MAX_RSS_MB:
                missed.append(f"{stage} at {r['images']:,} images: peak RSS {s['peak_rss_mb']} MB")
        if r["noop_repro_s"] >= MAX_NOOP_REPRO_S:
            missed.append(f"no-op dvc repro at {r['images']:,} images: {r['noop_repro_s']} s")
    return missed


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["images"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        left.plot(sizes, [r["stages"][stage]["seconds"] for r in results], marker="o", label=stage)
        right.plot(sizes, [r["stages"][stage]["peak_rss_mb"] for r in results], marker="o", label=stage)
    left.plot(sizes, [r["dvc_overhead_s"] for r in results], marker="s", linestyle="--", label="DVC overhead")
    left.set(xlabel="images", ylabel="seconds", title="Wall time per stage", xscale="log", yscale="log")
    right.axhline(MAX_RSS_MB, color="grey", linestyle=":", label="4 GB target")
    right.set(xlabel="images", ylabel="MB", title="Peak RSS per stage", xscale="log")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000, 30000], help="numbers of images")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        results = []
        with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
            for n in args.sizes:
                results.append(measure(args.shared, n, Path(tmp) / str(n)))
        before = load_results(NAME).get("before_fixes") if (RESULTS / f"{NAME}.json").is_file() else None
        report = stamp() | {"runs": results} | ({"before_fixes": before} if before else {})
        save_results(NAME, report)
        chart(results, CHART)
    publish(blocks(report))


if __name__ == "__main__":
    main()

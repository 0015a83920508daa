"""Extraction's engines side by side: ONNX Runtime against Keras, per backbone: `python -m benchmarks.extraction`.

For every default backbone of params.yaml (the shared ImageNet weights where the shared folder has them,
random weights elsewhere: the compute is the same), in one process: the float32 base as the features stage
runs it with each engine (Keras' constant-weight function, `tlpipe.extraction.base_forward`; ONNX Runtime,
`tlpipe.extraction.onnx_forward`), over the same in-memory batches, interleaved (Keras, ONNX Runtime,
Keras, ...) for several rounds, the fastest round of each counting; and Keras in bfloat16 where this CPU
computes it natively, for context. For each: images/s, achieved GFLOP/s (convolution and dense FLOPs per
image counted from the model, as `benchmarks.benchmark` counts them) and the fraction of this machine's
float32 matrix-multiply peak, measured in the same run (NumPy's and TensorFlow's float32 matmul, the faster,
at the start and at the end of the run, the higher).
Then the stage end to end (decoding the shared zip's JPEGs, then the forward pass: the stage's
`LocalEngine`) for MobileNetV2 and EfficientNetB0 with each engine. Writes benchmarks/extraction.json and
renders its tables into docs/performance.md (the `extraction` markers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import (
    Block,
    backbones_with_offline_weights,
    benchmark_parser,
    load_results,
    markdown,
    measured,
    publish,
    save_results,
    stamp,
)
from tests.helpers import SHARED_DIR

NAME = "extraction"
PAGE = "docs/performance.md"
ZIP = "data/cats_and_dogs_filtered.zip"
BATCH_SIZE = 32
ROUNDS = 3
# Each timed run covers at least one batch and about this many seconds.
WINDOW_SECONDS = 3.0
# The backbones whose stage is also timed end to end, decoding included, and on how many of the zip's images.
END_TO_END = ("mobilenet", "effnet")
END_TO_END_IMAGES = 320


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument("--backbone", action="append", help="measure only this params.yaml backbone (repeatable)")
    return parser


def numpy_matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    """NumPy's (its BLAS's) float32 matrix multiply, GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    a @ b
    fastest = float("inf")
    for _ in range(repeats):  # the fastest repeat: what the machine can do, not what a busy moment left
        started = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * n**3 / fastest / 1e9


def matmul_peak(before: dict[str, float] | None = None) -> dict[str, float]:
    """The float32 matmul peak of this machine: NumPy's and TensorFlow's (benchmarks.benchmark's measurement),
    the faster of the two counting, and the faster of this and the measurement `before` (the same taken at
    the start of the run: a shared machine can be busy at either end)."""
    from benchmarks.benchmark import matmul_gflops

    rates = {"numpy": numpy_matmul_gflops(), "tensorflow": matmul_gflops("float32")}
    rates = {name: round(max(rate, (before or {}).get(name, 0.0)), 1) for name, rate in rates.items()}
    return rates | {"peak": max(rates.values())}


def fastest_rates(runs: dict[str, Callable[[], Any]], n_images: int) -> dict[str, float]:
    """Images/s of each run, the runs interleaved ROUNDS times and the fastest round of each counting: a
    stall of a shared machine then lands on no one side."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(ROUNDS):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: n_images / seconds for name, seconds in best.items()}


def in_memory(forward: Callable[[Any], Any], batches: list[np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            np.asarray(forward(batch))

    return run


def engines_of(key: str, spec: dict[str, Any], bfloat16: bool, n_images: int) -> dict[str, Any]:
    """{name: forward} of each engine for this backbone, the ONNX conversion's seconds, the GFLOPs of one
    image and whether the base has depthwise convolutions."""
    from benchmarks.benchmark import forward_flops
    from tlpipe.extraction import base_forward, has_depthwise_convolutions, load_extractor, onnx_forward

    size = spec["image_size"]
    extractor, _ = load_extractor(key, spec, 0)
    started = time.perf_counter()
    onnx = onnx_forward(extractor, size)
    conversion = time.perf_counter() - started
    forwards = {"keras_float32": base_forward(extractor, size, n_images), "onnx_float32": onnx}
    if bfloat16:
        forwards["keras_bfloat16"] = base_forward(load_extractor(key, spec, 0, "bfloat16")[0], size, n_images)
    return {
        "forwards": forwards,
        "onnx_conversion_s": round(conversion, 1),
        "gflops_per_image": round(forward_flops(extractor) / 1e9, 3),
        "depthwise": has_depthwise_convolutions(extractor),
    }


def measure_backbone(key: str, spec: dict[str, Any], params: dict[str, Any], bfloat16: bool) -> dict[str, Any]:
    from tlpipe.extraction import choose_engine
    from tlpipe.params import extraction_precision

    size = spec["image_size"]
    rng = np.random.default_rng(0)
    one = [rng.uniform(0, 255, (BATCH_SIZE, size, size, 3)).astype(np.float32)]
    built = engines_of(key, spec, bfloat16, 10_000)
    forwards = built["forwards"]
    for forward in forwards.values():  # warm up, and time one batch to size the window
        forward(one[0])
    rate = fastest_rates({"one": in_memory(forwards["keras_float32"], one)}, BATCH_SIZE)["one"]
    n_batches = int(np.clip(WINDOW_SECONDS * rate / BATCH_SIZE, 1, 8))
    batches = [rng.uniform(0, 255, (BATCH_SIZE, size, size, 3)).astype(np.float32) for _ in range(n_batches)]
    rates = fastest_rates({name: in_memory(f, batches) for name, f in forwards.items()}, n_batches * BATCH_SIZE)
    gflops = built["gflops_per_image"]
    precision = extraction_precision(params, key)
    engine, _ = choose_engine("auto", precision, built["depthwise"], gpu=False)
    result = {
        "arch": spec["arch"],
        "image_size": size,
        "weights": "imagenet" if spec["weights"] else "random",
        "gflops_per_image": gflops,
        "onnx_conversion_s": built["onnx_conversion_s"],
        "images": n_batches * BATCH_SIZE,
        "engines": {
            name: {"images_per_second": round(rate, 1), "gflops_per_second": round(rate * gflops, 1)}
            for name, rate in rates.items()
        },
        "onnx_vs_keras": round(rates["onnx_float32"] / rates["keras_float32"], 2),
        "default": {"precision": precision, "engine": engine},
    }
    print(f"  {key}: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items()) + " images/s", file=sys.stderr)
    return result


def zip_images(archive: Path, folder: Path, n: int) -> list[str]:
    """The first `n` JPEGs of the zip (by name), unpacked into `folder`."""
    with zipfile.ZipFile(archive) as source:
        names = sorted(name for name in source.namelist() if name.endswith(".jpg"))[:n]
        source.extractall(folder, names)
    return [str(folder / name) for name in names]


def end_to_end(key: str, spec: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Images/s of the stage's decode-and-forward (LocalEngine.files) over the same files with each engine."""
    from tlpipe.extraction import LocalEngine

    forwards = engines_of(key, spec, False, len(paths))["forwards"]
    engines = {name: LocalEngine(f, spec["image_size"], BATCH_SIZE) for name, f in forwards.items()}
    rates = fastest_rates({name: lambda e=e: e.files(paths, key) for name, e in engines.items()}, len(paths))
    print(f"  {key} end to end: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items()), file=sys.stderr)
    return {
        "images": len(paths),
        "keras_float32": round(rates["keras_float32"], 1),
        "onnx_float32": round(rates["onnx_float32"], 1),
        "onnx_vs_keras": round(rates["onnx_float32"] / rates["keras_float32"], 2),
    }


def measure(shared: Path, only: list[str] | None) -> dict[str, Any]:
    import yaml

    from benchmarks import PROJECT_ROOT
    from tlpipe.params import bfloat16_hardware, with_defaults

    archive = shared / ZIP
    if not archive.is_file():
        sys.exit(f"{archive} not found; see CONTRIBUTING.md (the folder SHARED_DIR names)")
    params = with_defaults(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    backbones = {k: v for k, v in backbones_with_offline_weights(shared).items() if not only or k in only}
    bfloat16 = bfloat16_hardware(gpu=False)
    peak = matmul_peak()
    print(f"float32 matmul: {peak} GFLOP/s; bfloat16 arithmetic: {bfloat16}", file=sys.stderr)
    results = {key: measure_backbone(key, spec, params, bool(bfloat16)) for key, spec in backbones.items()}
    with tempfile.TemporaryDirectory(prefix="extraction-") as folder:
        paths = zip_images(archive, Path(folder), END_TO_END_IMAGES)
        stage = {key: end_to_end(key, backbones[key], paths) for key in END_TO_END if key in backbones}
    # The fractions of the peak are computed against the higher of the two measurements of the run.
    peak = matmul_peak(peak)
    for result in results.values():
        for engine in result["engines"].values():
            engine["fraction_of_peak"] = round(engine["gflops_per_second"] / peak["peak"], 3)
    return {
        "cpus": os.cpu_count(),
        "bfloat16_hardware": bfloat16,
        "matmul_gflops": peak,
        "batch_size": BATCH_SIZE,
        "rounds": ROUNDS,
        "backbones": results,
        "end_to_end": stage,
    }


ENGINES = {"keras_float32": "Keras float32", "onnx_float32": "ONNX Runtime float32", "keras_bfloat16": "Keras bfloat16"}


def engine_table(report: dict[str, Any]) -> str:
    columns = {"backbone": "backbone", "weights": "weights", "gflops": "GFLOPs/image"}
    for name, title in ENGINES.items():
        columns |= {f"{name}_rate": f"{title}: images/s", f"{name}_gflops": "GFLOP/s", f"{name}_peak": "% of peak"}
    columns |= {"ratio": "ONNX Runtime vs Keras float32", "default": "default here (`auto`)"}
    rows = []
    for key, b in report["backbones"].items():
        row = {
            "backbone": f"{key} ({b['arch']} at {b['image_size']})",
            "weights": b["weights"],
            "gflops": f"{b['gflops_per_image']:.2f}",
            "ratio": f"**{b['onnx_vs_keras']:.2f}x**",
            "default": f"{b['default']['engine']}, {b['default']['precision']}",
        }
        for name, e in b["engines"].items():
            row |= {
                f"{name}_rate": f"{e['images_per_second']:.1f}",
                f"{name}_gflops": f"{e['gflops_per_second']:.0f}",
                f"{name}_peak": f"{100 * e['fraction_of_peak']:.0f}%",
            }
        rows.append(row)
    return markdown(rows, columns, left=2)


def stage_table(report: dict[str, Any]) -> str:
    rows = [
        {
            "backbone": key,
            "images": r["images"],
            "keras": f"{r['keras_float32']:.1f}",
            "onnx": f"{r['onnx_float32']:.1f}",
            "ratio": f"**{r['onnx_vs_keras']:.2f}x**",
        }
        for key, r in report["end_to_end"].items()
    ]
    columns = {
        "backbone": "backbone",
        "images": "JPEG files",
        "keras": "Keras float32: images/s",
        "onnx": "ONNX Runtime float32: images/s",
        "ratio": "ONNX Runtime vs Keras",
    }
    return markdown(rows, columns)


def table(report: dict[str, Any]) -> str:
    peak = report["matmul_gflops"]
    conversions = ", ".join(f"{key} {b['onnx_conversion_s']:.0f} s" for key, b in report["backbones"].items())
    return "\n".join(
        [
            f"{measured(report, NAME)}: the float32 base of each default backbone over the same in-memory batches "
            f"of {report['batch_size']} images, each engine as the features stage runs it, the fastest of "
            f"{report['rounds']} interleaved rounds; the float32 matmul peak of this run "
            f"{peak['peak']:.0f} GFLOP/s (NumPy {peak['numpy']:.0f}, TensorFlow {peak['tensorflow']:.0f}). "
            "Keras bfloat16 where this CPU computes it natively. The last column is what `features.engine: auto` "
            "and `features.precision: auto` pick here with the default params.yaml.",
            "",
            engine_table(report),
            "",
            f"Converting the base to ONNX, once per run of the stage: {conversions}. The stage end to end, decoding "
            "the same JPEG files of the shared zip and the forward pass (the stage's `LocalEngine`), the fastest "
            f"of {report['rounds']} interleaved rounds:",
            "",
            stage_table(report),
        ]
    )


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {(PAGE, NAME): table(report)}


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        report = load_results(NAME)
    else:
        report = stamp() | measure(args.shared.resolve(), args.backbone)
        save_results(NAME, report)
    publish(blocks(report))


if __name__ == "__main__":
    main()

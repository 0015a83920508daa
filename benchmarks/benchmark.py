"""Speed of the pipeline against the classic recipe and against the machine's limits.

    python -m benchmarks.benchmark [--backbone mobilenet] [--shared DIR]

On the shared cats_and_dogs_filtered zip, in one run, it measures:
1. wall time and test accuracy of our pipeline for one backbone (its features, train and evaluate stages)
   against the classic recipe (`benchmarks/classic.py`: augmentation on the fly, frozen base in every step,
   10 epochs), both timed as whole processes, and the ratio;
2. each backbone's feature-extraction throughput (the stage's own decode-and-forward code) against the raw
   forward-pass ceiling (the faster of the bare Keras model in tf.function and the stage's constant-weight
   function, on in-memory tensors) and against that ceiling plus decoding the same files alone, measured
   alternately in this process so that a busy machine slows all alike, in float32 and bfloat16; and against
   the machine's floating-point ceiling (a large matmul);
3. wall time and peak memory (RSS) of every stage of the full pipeline, run stage by stage with DVC;
4. the time of a no-op `dvc repro`;
5. accuracy and extraction time of the other `features.precision` for the backbones with real weights.
Writes benchmarks/benchmark.json and the run's comparison table to benchmarks/benchmark_comparison.md, and
renders its tables into docs/performance.md (the `benchmark` and `levers` markers) and the classic-recipe
comparison into README.md (the `classic` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import (
    PROJECT_ROOT,
    RESULTS,
    Block,
    backbones_with_offline_weights,
    benchmark_parser,
    load_results,
    measured,
    save_results,
    stamp,
    write_blocks,
)
from tests.helpers import SHARED_DIR, make_project
from tlpipe.backbones import PRECISIONS, build_extractor
from tlpipe.datasets import image_dataset
from tlpipe.extraction import extract, traced
from tlpipe.models import inference_function

NAME = "benchmark"
PAGE = "docs/performance.md"
README = "README.md"


def run_timed(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the largest process in the command's tree, stdout)."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{cwd}{os.pathsep}{PROJECT_ROOT}",
    }
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{stderr.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, stdout.read()


def backbone_stages(keys: list[str]) -> list[str]:
    """The per-backbone stages of `keys`, each after the stages it depends on."""
    return [f"{stage}@{k}" for stage in ("features", "train", "evaluate") for k in keys]


def timed_stages(project: Path, stages: list[str]) -> dict[str, dict[str, float]]:
    results = {}
    for stage in stages:
        seconds, rss, _ = run_timed([sys.executable, "-m", "dvc", "repro", "--single-item", stage], project)
        results[stage] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss)}
        print(f"  {stage:24s} {seconds:7.1f} s  {rss:7.0f} MB", file=sys.stderr)
    return results


def startup_seconds(project: Path) -> float:
    """Wall time of a process that only starts Python and imports TensorFlow and Keras, as every stage does."""
    return min(run_timed([sys.executable, "-c", "import tensorflow, keras"], project)[0] for _ in range(3))


def matmul_gflops(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    product = tf.function(lambda: tf.linalg.matmul(a, b))
    product().numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        product().numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def forward_flops(model: Any) -> float:
    """Multiply-adds x 2 of the convolution and dense layers for one image."""
    return sum(layer_flops(layer) for layer in _all_layers(model))


def layer_flops(layer: Any) -> float:
    """Multiply-adds x 2 of one layer for one image: convolution and dense layers, 0 for the others."""
    import keras

    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        return 0.0
    out_shape = layer.output.shape
    spatial = float(np.prod([d for d in out_shape[1:-1] if d])) if len(out_shape) > 2 else 1.0
    kernel = layer.get_weights()[0].shape
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return 2 * spatial * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    return 2 * spatial * float(np.prod(kernel))


def _all_layers(model: Any) -> list[Any]:
    layers = []
    for layer in model.layers:
        layers += _all_layers(layer) if hasattr(layer, "layers") else [layer]
    return layers


def _seconds(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def extraction_against_ceiling(
    spec: dict[str, Any],
    paths: list[str],
    precision: str,
    batch_size: int,
    window_seconds: float = 5.0,
    rounds: int = 3,
) -> dict[str, float]:
    """Images/s of the features stage's extraction (decode + forward: `tlpipe.extraction.extract` over the
    stage's constant-weight forward function) against the raw ceiling over the same number of images.

    The raw ceiling is the faster of two forward passes over one in-memory batch: the bare Keras model in
    tf.function (variables live) and the stage's own constant-weight function; `keras_model` and
    `constant_weights` report both. Decoding the same files alone (`decode_only`) gives the bound for
    decode + forward on shared cores, `ceiling_with_decoding`: the two back to back, each on every core.
    The four alternate, `rounds` times each, and the fastest of each counts: this machine shares its host
    and now and then stalls for seconds, which would otherwise land on one side.
    """
    import tensorflow as tf

    size = spec["image_size"]
    extractor, _ = build_extractor(spec["arch"], size, spec["weights"], 0, precision)
    keras_model = traced(lambda images: extractor(images, training=False), size)
    # Steady-state rates, weights as constants: what the stage runs over models.FREEZE_FROM_IMAGES images or more.
    forward = inference_function(lambda images: extractor(images, training=False), (None, size, size, 3))
    in_memory = tf.random.uniform((batch_size, size, size, 3), 0, 255)

    def in_memory_run(function: Callable[[Any], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n_batches):
                function(in_memory).numpy()

        return run

    def pipeline_run() -> None:
        extract(forward, paths[:n_images], size, batch_size, f"{spec['arch']} {precision}")

    def decode_run() -> None:
        for _ in image_dataset(paths[:n_images], size, batch_size):
            pass

    n_batches = 1
    per_batch = min(_seconds(in_memory_run(function)) for function in (keras_model, forward, keras_model, forward))
    n_batches = int(np.clip(window_seconds / per_batch, 2, len(paths) // batch_size))
    n_images = n_batches * batch_size
    runs = {
        "keras_model": in_memory_run(keras_model),
        "constant_weights": in_memory_run(forward),
        "pipeline": pipeline_run,
        "decode_only": decode_run,
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], _seconds(run))
    ceiling = min(best["keras_model"], best["constant_weights"])
    return {
        "pipeline": round(n_images / best["pipeline"], 1),
        "ceiling": round(n_images / ceiling, 1),
        "percent_of_ceiling": round(100 * ceiling / best["pipeline"], 1),
        "keras_model": round(n_images / best["keras_model"], 1),
        "constant_weights": round(n_images / best["constant_weights"], 1),
        "decode_only": round(n_images / best["decode_only"], 1),
        "ceiling_with_decoding": round(n_images / (ceiling + best["decode_only"]), 1),
        "percent_of_ceiling_with_decoding": round(100 * (ceiling + best["decode_only"]) / best["pipeline"], 1),
        "images": n_images,
        "gflops_per_image": round(forward_flops(extractor) / 1e9, 3),
    }


def throughput_table(project: Path, backbones: dict[str, dict[str, Any]], batch_size: int) -> dict[str, Any]:
    import pandas as pd

    paths = [str(project / p) for p in pd.read_csv(project / "data/prepared/manifest.csv")["path"]]
    table = {}
    for key, spec in backbones.items():
        table[key] = {
            precision: extraction_against_ceiling(spec, paths, precision, batch_size) for precision in PRECISIONS
        }
        print(
            f"  {key}: "
            + ", ".join(
                f"{p} {t['pipeline']} vs ceiling {t['ceiling']} images/s ({t['percent_of_ceiling']}%; "
                f"{t['percent_of_ceiling_with_decoding']}% of it with decoding)"
                for p, t in table[key].items()
            ),
            file=sys.stderr,
        )
    return table


def flip_precision(project: Path, keys: list[str], configured: dict[str, str]) -> None:
    """Set backbones.<key>.precision to the other precision for `keys` in the project's params.yaml."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    for key in keys:
        params["backbones"][key]["precision"] = next(p for p in PRECISIONS if p != configured[key])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def table(report: dict[str, Any]) -> str:
    c = report["classic"]
    stages = report["stages"]
    full = sum(v["seconds"] for k, v in stages.items() if k not in ("finetune", "ship", "evaluate_model"))
    throughput = [
        "| backbone | precision | extraction images/s | in memory: Keras model | in memory: constant weights | "
        "% of ceiling | decoding alone | % of ceiling with decoding | GFLOPs/image | % of matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, by_precision in report["throughput"].items():
        for precision, t in by_precision.items():
            mark = " (configured)" if precision == report["precision"][key] else ""
            throughput.append(
                f"| {key} | {precision}{mark} | {t['pipeline']:.1f} | {t['keras_model']:.1f} | {t['constant_weights']:.1f} | "
                f"{t['percent_of_ceiling']:.0f}% | {t['decode_only']:.0f} | {t['percent_of_ceiling_with_decoding']:.0f}% | "
                f"{t['gflops_per_image']:.2f} | {t['percent_of_flop_peak']:.0f}% |"
            )
    accuracy = ["| backbone (real weights) | precision | test accuracy | features stage |", "|---|---|---:|---:|"]
    for key, by_precision in report["precision_accuracy"].items():
        for precision, r in by_precision.items():
            accuracy.append(f"| {key} | {precision} | {r['accuracy']:.4f} | {r['features_seconds']:.0f} s |")
    return "\n".join(
        [
            f"{measured(report, NAME)}"
            + (
                f" (extraction, start-up and matmul peaks re-measured on {report['in_process']['machine']}, "
                f"{report['in_process']['date']}, with `--in-process-only`)"
                if "in_process" in report
                else ""
            )
            + f": matmul peak {report['matmul_gflops']['float32']:.0f} GFLOP/s in float32, "
            f"{report['matmul_gflops']['bfloat16']:.0f} in bfloat16.",
            "",
            f"| {c['backbone']}, same data, whole processes | wall time | test accuracy | this pipeline's speed-up |",
            "|---|---:|---:|---:|",
            f"| classic recipe (augment on the fly, base in every step, 10 epochs), tf.data's AUTOTUNE as keras.io "
            f"writes it | {c['classic_autotune_seconds']:.0f} s | {c['classic_autotune_accuracy']:.4f} | "
            f"**{c['speedup_autotune']:.1f}x** |",
            f"| the same recipe on this pipeline's tf.data settings | {c['classic_seconds']:.0f} s | "
            f"{c['classic_accuracy']:.4f} | **{c['speedup']:.1f}x** |",
            f"| this pipeline (features, train and evaluate stages) | {c['ours_seconds']:.0f} s | {c['ours_accuracy']:.4f} | |",
            "",
            f"Every process pays Python and TensorFlow start-up ({c['startup_seconds']:.1f} s here): the three stages "
            f"three times, the classic recipe once. Without it: {c['classic_seconds'] - c['startup_seconds']:.0f} s "
            f"against {c['ours_seconds'] - 3 * c['startup_seconds']:.0f} s, "
            f"{(c['classic_seconds'] - c['startup_seconds']) / (c['ours_seconds'] - 3 * c['startup_seconds']):.1f}x.",
            "",
            *throughput,
            "",
            "Extraction is the features stage's own code: decode the files, then the base with its weights as "
            "constants (`tlpipe.extraction.base_forward`, from `models.FREEZE_FROM_IMAGES` images on). The raw ceiling is the faster of the two in-memory "
            "forward passes over one batch: the bare Keras model in tf.function, and the same constant-weight "
            "function. Decoding is CPU work on the same cores: the ceiling with decoding is the in-memory pass "
            "and decoding alone (images/s in its column) back to back, each with every core, what the two cost "
            "together. Images/s are the fastest of three alternating runs each, so that a stall of this shared "
            "machine counts against no side. Above 100% of the matmul peak, the convolution kernels beat "
            "TensorFlow's plain matmul of the same precision.",
            "",
            *accuracy,
            "",
            f"Full pipeline, fetch to aggregate without fine-tuning, {len(report['throughput'])} backbones: **{full / 60:.1f} min**; "
            f"fine-tuning {report['model']}: {stages['finetune']['seconds'] / 60:.1f} min; "
            f"largest peak memory of any stage: {max(v['peak_rss_mb'] for v in stages.values()) / 1024:.1f} GB "
            f"({max(stages, key=lambda k: stages[k]['peak_rss_mb'])}); no-op `dvc repro`: {report['noop_repro_seconds']:.1f} s.",
        ]
    )


def in_process_measurements(project: Path, backbones: dict[str, dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Start-up time, matmul peaks and extraction against the ceiling (needs a prepared project)."""
    startup = startup_seconds(project)
    print("extraction against the raw ceiling, in this process:", file=sys.stderr)
    flop_peak = {precision: round(matmul_gflops(precision), 1) for precision in PRECISIONS}
    throughput = throughput_table(project, backbones, batch_size)
    for by_precision in throughput.values():
        for precision, t in by_precision.items():
            t["percent_of_flop_peak"] = round(100 * t["pipeline"] * t["gflops_per_image"] / flop_peak[precision], 1)
    return {"startup_seconds": round(startup, 1), "matmul_gflops": flop_peak, "throughput": throughput}


def classic_table(report: dict[str, Any]) -> str:
    """The classic-recipe comparison in short, for the README."""
    c = report["classic"]
    return "\n".join(
        [
            f"{measured(report, NAME)}: {c['backbone']} on `cats_and_dogs_filtered`, each run timed as whole "
            "processes, start-up included.",
            "",
            "| recipe | wall time | test accuracy | this pipeline's speed-up |",
            "|---|---:|---:|---:|",
            f"| classic: augmentation on the fly, the base in every step of 10 epochs | {c['classic_seconds']:.0f} s | "
            f"{c['classic_accuracy']:.4f} | **{c['speedup']:.1f}x** |",
            f"| this pipeline: features, train and evaluate stages | {c['ours_seconds']:.0f} s | "
            f"{c['ours_accuracy']:.4f} | |",
        ]
    )


def levers_table(report: dict[str, Any]) -> str:
    """What each lever of extraction is worth per backbone, from the same in-process measurements."""
    lines = [
        f"{measured(report, NAME)}: in-process images/s of the same run as the tables below; the decoding column is "
        "decoding and resizing one image, with every core, against one image's forward pass in the configured "
        "precision.",
        "",
        "| backbone | configured precision | constant weights vs the Keras model, in memory | bfloat16 vs float32 "
        "extraction | decoding one image (ms) | decoding against the forward pass | extraction, % of the ceiling "
        "with decoding |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, by_precision in report["throughput"].items():
        precision = report["precision"][key]
        t = by_precision[precision]
        lines.append(
            f"| {key} | {precision} | {t['constant_weights'] / t['keras_model']:.2f}x | "
            f"{by_precision['bfloat16']['pipeline'] / by_precision['float32']['pipeline']:.2f}x | "
            f"{1000 / t['decode_only']:.2f} | {t['ceiling'] / t['decode_only']:.0%} | "
            f"{t['percent_of_ceiling_with_decoding']:.0f}% |"
        )
    return "\n".join(lines)


def blocks(report: dict[str, Any]) -> dict[Block, str]:
    return {
        (PAGE, NAME): table(report),
        (PAGE, "levers"): levers_table(report),
        (README, "classic"): classic_table(report),
    }


def argument_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--backbone", default="mobilenet", help="the backbone of the classic-recipe comparison")
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data and weights")
    parser.add_argument(
        "--in-process-only",
        action="store_true",
        help=f"keep the pipeline, classic and precision results of {NAME}.json; re-measure start-up, matmul peaks "
        "and extraction against the ceiling",
    )
    return parser


def write_report(report: dict[str, Any]) -> None:
    save_results(NAME, report)
    rendered = blocks(report)
    write_blocks(rendered)
    print(rendered[(PAGE, NAME)])


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    if args.table_only:
        write_report(load_results(NAME))
        return
    shared = args.shared.resolve()
    backbones = backbones_with_offline_weights(shared)
    keys = list(backbones)
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        project = make_project(
            Path(tmp) / "project",
            {
                "data": {"url": (shared / "data" / "cats_and_dogs_filtered.zip").as_uri()},
                "backbones": backbones,
                "model": args.backbone,
            },
        )
        from tlpipe.params import extraction_precision, load_params

        params = load_params(project / "params.yaml")
        batch_size = params["features"]["batch_size"]
        if args.in_process_only:
            report = load_results(NAME)
            timed_stages(project, ["fetch", "prepare"])
            remeasured = in_process_measurements(project, backbones, batch_size)
            report["classic"]["startup_seconds"] = remeasured.pop("startup_seconds")
            # The rest of the report keeps its own machine and date; the table names both when they differ.
            write_report(report | remeasured | {"in_process": stamp()})
            return
        configured = {key: extraction_precision(params, key) for key in keys}
        print("pipeline, stage by stage:", file=sys.stderr)
        stages = timed_stages(
            project,
            ["validate", "fetch", "prepare", *backbone_stages(keys), "finetune", "ship", "evaluate_model", "aggregate"],
        )
        noop, _, _ = run_timed([sys.executable, "-m", "dvc", "repro"], project)
        print(f"no-op dvc repro: {noop:.1f} s", file=sys.stderr)
        metrics = {k: json.loads((project / "metrics" / f"{k}.json").read_text()) for k in [*keys, "model"]}
        (RESULTS / "benchmark_comparison.md").write_text((project / "reports" / "comparison.md").read_text())

        print("classic recipe, on the pipeline's tf.data settings and on AUTOTUNE:", file=sys.stderr)
        classic_seconds, _, classic_out = run_timed(
            [sys.executable, "-m", "benchmarks.classic", args.backbone], project
        )
        classic_accuracy = json.loads(classic_out.strip().splitlines()[-1])["accuracy"]
        print(f"  {classic_seconds:.1f} s, accuracy {classic_accuracy}", file=sys.stderr)
        autotune_seconds, _, autotune_out = run_timed(
            [sys.executable, "-m", "benchmarks.classic", args.backbone, "--autotune"], project
        )
        autotune_accuracy = json.loads(autotune_out.strip().splitlines()[-1])["accuracy"]
        print(f"  {autotune_seconds:.1f} s, accuracy {autotune_accuracy}", file=sys.stderr)

        real = [k for k in keys if backbones[k]["weights"]]
        print(f"the other precision for {', '.join(real)}:", file=sys.stderr)
        flip_precision(project, real, configured)
        flipped = timed_stages(project, backbone_stages(real))
        precision_accuracy = {}
        for key in real:
            other = json.loads((project / "metrics" / f"{key}.json").read_text())
            precision_accuracy[key] = {
                configured[key]: {
                    "accuracy": metrics[key]["accuracy"],
                    "features_seconds": stages[f"features@{key}"]["seconds"],
                },
                next(p for p in PRECISIONS if p != configured[key]): {
                    "accuracy": other["accuracy"],
                    "features_seconds": flipped[f"features@{key}"]["seconds"],
                },
            }
        # Last: a child's peak RSS starts from this process's size at fork, which the in-process part inflates.
        in_process = in_process_measurements(project, backbones, batch_size)
    ours = sum(stages[f"{s}@{args.backbone}"]["seconds"] for s in ("features", "train", "evaluate"))
    write_report(
        stamp()
        | {
            "matmul_gflops": in_process["matmul_gflops"],
            "model": args.backbone,
            "precision": configured,
            "classic": {
                "backbone": args.backbone,
                "classic_seconds": round(classic_seconds, 1),
                "classic_autotune_seconds": round(autotune_seconds, 1),
                "classic_autotune_accuracy": round(autotune_accuracy, 4),
                "speedup_autotune": round(autotune_seconds / ours, 2),
                "classic_accuracy": round(classic_accuracy, 4),
                "ours_seconds": round(ours, 1),
                "ours_accuracy": metrics[args.backbone]["accuracy"],
                "speedup": round(classic_seconds / ours, 2),
                "startup_seconds": in_process["startup_seconds"],
            },
            "throughput": in_process["throughput"],
            "stage_images_per_second": {k: metrics[k]["images_per_second"] for k in keys},
            "precision_accuracy": precision_accuracy,
            "stages": stages,
            "noop_repro_seconds": round(noop, 2),
            "accuracy": {k: m["accuracy"] for k, m in metrics.items()},
            "weights": {
                k: "imagenet (offline file)" if spec["weights"] else "random (no offline weights)"
                for k, spec in backbones.items()
            },
        }
    )


if __name__ == "__main__":
    main()

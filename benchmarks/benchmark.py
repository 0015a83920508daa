"""Speed of the pipeline against the classic recipe and against the machine's limits.

    python -m benchmarks.benchmark [--backbone mobilenet] [--shared ../shared]

On the shared cats_and_dogs_filtered zip, in one run, it measures:
1. wall time and test accuracy of our pipeline for one backbone (features once, head on cached features)
   against the classic recipe (augmentation on the fly, frozen base in every step, 10 epochs), and the ratio;
2. each backbone's feature-extraction throughput against the raw forward-pass ceiling (the bare model in
   tf.function on in-memory tensors) and against the machine's floating-point ceiling (a large matmul);
3. wall time and peak memory (RSS) of every stage of the full pipeline, run stage by stage with DVC;
4. the time of a no-op `dvc repro`.
Writes reports/benchmark.json, the run's comparison table to reports/benchmark_comparison.md, and the
speed table between the benchmark markers in README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from stages.backbones import build_extractor  # noqa: E402
from tests.helpers import make_project  # noqa: E402

SHARED_WEIGHTS = {"VGG16": "vgg16_imagenet_notop.weights.h5", "MobileNetV2": "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"}
README_MARKERS = ("<!-- benchmark:start -->", "<!-- benchmark:end -->")


def backbones_with_offline_weights(shared: Path) -> dict[str, dict[str, Any]]:
    """The default five; real weights where ../shared has them, random otherwise (same compute)."""
    import yaml

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    out = {}
    for key, spec in params["backbones"].items():
        weights = SHARED_WEIGHTS.get(spec["arch"])
        out[key] = spec | {"weights": str(shared / "weights" / weights) if weights else None}
    return out


def run_timed(args: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the largest process in the command's tree)."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{process.stderr.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def stage_order(project: Path) -> list[str]:
    """Every stage, each after the stages it depends on."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    keys = list(params["backbones"])
    return (["fetch", "prepare"] + [f"features@{k}" for k in keys] + [f"train@{k}" for k in keys]
            + [f"evaluate@{k}" for k in keys] + ["finetune", "evaluate_model", "aggregate"])


def pipeline_stages(project: Path) -> dict[str, dict[str, float]]:
    results = {}
    for stage in stage_order(project):
        seconds, rss = run_timed([sys.executable, "-m", "dvc", "repro", "--single-item", stage], project)
        results[stage] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss)}
        print(f"  {stage:24s} {seconds:7.1f} s  {rss:7.0f} MB", file=sys.stderr)
    return results


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    product = tf.function(lambda: tf.linalg.matmul(a, b))
    product().numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        product().numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def forward_flops(model: Any) -> float:
    """Multiply-adds x 2 of the convolution and dense layers for one image."""
    import keras

    total = 0.0
    for layer in _all_layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            out_shape = layer.output.shape
            spatial = float(np.prod([d for d in out_shape[1:-1] if d])) if len(out_shape) > 2 else 1.0
            kernel = layer.get_weights()[0].shape
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                macs = spatial * kernel[0] * kernel[1] * kernel[2] * kernel[3]
            else:
                macs = spatial * float(np.prod(kernel))
            total += 2 * macs
    return total


def _all_layers(model: Any) -> list[Any]:
    layers = []
    for layer in model.layers:
        layers += _all_layers(layer) if hasattr(layer, "layers") else [layer]
    return layers


def raw_ceiling(spec: dict[str, Any], batch_size: int = 32, batches: int = 6) -> tuple[float, float]:
    """(images/s of the bare extractor in tf.function on in-memory tensors, GFLOPs per image)."""
    import tensorflow as tf

    extractor, _ = build_extractor(spec["arch"], spec["image_size"], None)
    forward = tf.function(lambda x: extractor(x, training=False))
    images = tf.random.uniform((batch_size, spec["image_size"], spec["image_size"], 3), 0, 255)
    forward(images).numpy()
    started = time.perf_counter()
    for _ in range(batches):
        forward(images).numpy()
    return batch_size * batches / (time.perf_counter() - started), forward_flops(extractor) / 1e9


def classic_recipe(project: Path, spec: dict[str, Any], epochs: int = 10) -> tuple[float, float]:
    """The tutorial's way: frozen base + new head, augmentation on the fly, every image through the base
    in every step of every epoch. Returns (seconds, test accuracy)."""
    import keras

    from stages.datasets import augmentation_layers, image_dataset, read_manifest, split_rows
    from stages.params import load_params

    cwd = os.getcwd()
    os.chdir(project)
    try:
        params = load_params()
        keras.utils.set_random_seed(params["seed"])
        manifest = read_manifest()
        size = spec["image_size"]
        started = time.perf_counter()
        extractor, _ = build_extractor(spec["arch"], size, spec["weights"])
        inputs = keras.Input((size, size, 3))
        x = augmentation_layers(params["augment"], params["seed"])(inputs)
        x = extractor(x, training=False)
        x = keras.layers.Dropout(0.2)(x)
        outputs = keras.layers.Dense(1, activation="sigmoid")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss="binary_crossentropy", metrics=["accuracy"])
        data = {s: split_rows(manifest, s) for s in ("train", "val", "test")}
        batches = {
            s: image_dataset(list(rows["path"]), size, 32, rows["label_index"].to_numpy(), shuffle_seed=1 if s == "train" else None)
            for s, rows in data.items()
        }
        model.fit(batches["train"], validation_data=batches["val"], epochs=epochs, verbose=0)
        _, accuracy = model.evaluate(batches["test"], verbose=0)
        return time.perf_counter() - started, float(accuracy)
    finally:
        os.chdir(cwd)


def readme_table(report: dict[str, Any]) -> str:
    rows = ["| backbone | extraction images/s | raw ceiling images/s | % of ceiling | GFLOPs/image | % of matmul peak |",
            "|---|---:|---:|---:|---:|---:|"]
    for key, t in report["throughput"].items():
        rows.append(f"| {key} | {t['pipeline']:.1f} | {t['ceiling']:.1f} | {t['percent_of_ceiling']:.0f}% | "
                    f"{t['gflops_per_image']:.2f} | {t['percent_of_flop_peak']:.0f}% |")
    c = report["classic"]
    stages = report["stages"]
    full = sum(v["seconds"] for k, v in stages.items() if k not in ("finetune", "evaluate_model"))
    return "\n".join([
        f"Measured by `python -m benchmarks.benchmark` on {report['machine']}; matmul peak "
        f"{report['matmul_gflops']:.0f} GFLOP/s.",
        "",
        f"| {c['backbone']}, same data | wall time | test accuracy |",
        "|---|---:|---:|",
        f"| classic recipe (augment on the fly, base in every step, 10 epochs) | {c['classic_seconds']:.0f} s | {c['classic_accuracy']:.4f} |",
        f"| this pipeline (features once, head on cached features) | {c['ours_seconds']:.0f} s | {c['ours_accuracy']:.4f} |",
        f"| speed-up | **{c['speedup']:.1f}x** | |",
        "",
        *rows,
        "",
        f"Full pipeline, fetch to aggregate without fine-tuning, five backbones: **{full / 60:.1f} min**; "
        f"fine-tuning {report['model']}: {stages['finetune']['seconds'] / 60:.1f} min; "
        f"largest peak memory of any stage: {max(v['peak_rss_mb'] for v in stages.values()) / 1024:.1f} GB "
        f"({max(stages, key=lambda k: stages[k]['peak_rss_mb'])}); no-op `dvc repro`: {report['noop_repro_seconds']:.1f} s.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark")
    parser.add_argument("--backbone", default="mobilenet", help="the backbone of the classic-recipe comparison")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("SHARED_DIR", PROJECT_ROOT.parent / "shared")))
    args = parser.parse_args()
    shared = args.shared.resolve()
    backbones = backbones_with_offline_weights(shared)
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        project = make_project(
            Path(tmp) / "project",
            {"data": {"url": (shared / "data" / "cats_and_dogs_filtered.zip").as_uri()}, "backbones": backbones,
             "model": args.backbone},
        )
        print("pipeline, stage by stage:", file=sys.stderr)
        stages = pipeline_stages(project)
        noop, _ = run_timed([sys.executable, "-m", "dvc", "repro"], project)
        print(f"no-op dvc repro: {noop:.1f} s", file=sys.stderr)
        metrics = {k: json.loads((project / "metrics" / f"{k}.json").read_text()) for k in [*backbones, "model"]}
        comparison = (project / "reports" / "comparison.md").read_text()
        print("classic recipe:", file=sys.stderr)
        classic_seconds, classic_accuracy = classic_recipe(project, backbones[args.backbone])
    ours = sum(stages[f"{s}@{args.backbone}"]["seconds"] for s in ("features", "train", "evaluate"))
    flop_peak = matmul_gflops()
    throughput = {}
    for key, spec in backbones.items():
        ceiling, gflops = raw_ceiling(spec)  # random weights: the same arithmetic as ImageNet weights
        measured = metrics[key]["images_per_second"]
        throughput[key] = {"pipeline": measured, "ceiling": round(ceiling, 1),
                           "percent_of_ceiling": round(100 * measured / ceiling, 1), "gflops_per_image": round(gflops, 3),
                           "percent_of_flop_peak": round(100 * measured * gflops / flop_peak, 1)}
        print(f"  {key}: {measured} vs ceiling {ceiling:.1f} images/s", file=sys.stderr)
    report = {
        "machine": f"{os.cpu_count()} CPU cores",
        "matmul_gflops": round(flop_peak, 1),
        "model": args.backbone,
        "classic": {"backbone": args.backbone, "classic_seconds": round(classic_seconds, 1),
                    "classic_accuracy": round(classic_accuracy, 4), "ours_seconds": round(ours, 1),
                    "ours_accuracy": metrics[args.backbone]["accuracy"], "speedup": round(classic_seconds / ours, 2)},
        "throughput": throughput,
        "stages": stages,
        "noop_repro_seconds": round(noop, 2),
        "accuracy": {k: m["accuracy"] for k, m in metrics.items()},
        "weights": {k: "imagenet (offline file)" if spec["weights"] else "random (no offline weights)"
                    for k, spec in backbones.items()},
    }
    (PROJECT_ROOT / "reports").mkdir(exist_ok=True)
    (PROJECT_ROOT / "reports" / "benchmark_comparison.md").write_text(comparison)
    (PROJECT_ROOT / "reports" / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    readme = PROJECT_ROOT / "README.md"
    start, end = README_MARKERS
    text = readme.read_text()
    if start in text and end in text:
        table = readme_table(report)
        readme.write_text(re.sub(f"{re.escape(start)}.*{re.escape(end)}", lambda _: f"{start}\n{table}\n{end}", text, flags=re.S))
    print(readme_table(report))


if __name__ == "__main__":
    main()

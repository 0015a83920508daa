"""Stage features@<backbone>: run the frozen ImageNet base once over every image and cache pooled features.

This is what makes the pipeline cheap: the classic recipe pushes every image through the frozen base in
every epoch; here each image goes through once (plus `features.views` augmented copies of training
images) and the head then trains on the cached arrays in seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from tlpipe.datasets import SPLITS, augmentation_layers, read_manifest, split_rows
from tlpipe.errors import PipelineError, stage_main
from tlpipe.extraction import (
    Engine,
    LocalEngine,
    base_forward,
    bfloat16_notice,
    choose_engine,
    deployment_cost,
    extract_splits,
    extract_views,
    has_depthwise_convolutions,
    load_extractor,
    onnx_forward,
)
from tlpipe.feature_cache import compact, write_features
from tlpipe.params import load_params, precision_setting, resolve_precision
from tlpipe.runtime import seed_everything


@stage_main
def main(key: str) -> None:
    params = load_params()
    if key not in params["backbones"]:
        raise PipelineError(f"backbone {key!r} is not in params.yaml backbones: {', '.join(params['backbones'])}")
    spec, settings, seed = params["backbones"][key], params["features"], params["seed"]
    setting, source = precision_setting(params, key)
    precision, precision_reason = resolve_precision(setting, engine=settings["engine"])
    seed_everything(seed)
    if notice := bfloat16_notice(precision):
        print(f"{key}: {notice}", file=sys.stderr)

    manifest = read_manifest()
    size, batch_size, views = spec["image_size"], settings["batch_size"], settings["views"]
    rows = {split: split_rows(manifest, split) for split in SPLITS}
    n_images = sum(map(len, rows.values())) + views * len(rows["train"])

    engine, engine_reason = settings["engine"], "set explicitly"
    if engine == "ray":
        from tlpipe.ray_engine import RayEngine

        job = {"key": key, "spec": dict(spec), "seed": seed, "precision": precision}
        with RayEngine(settings["ray"], job | {"batch_size": batch_size, "n_images": n_images}) as ray:
            started = time.perf_counter()
            arrays = extract_all(ray, rows, settings, seed, size, key)
            seconds = time.perf_counter() - started
    else:
        extractor, n_params = load_extractor(key, spec, seed, precision)
        engine, engine_reason = choose_engine(engine, precision, has_depthwise_convolutions(extractor))
        # Compiled, or converted, before the clock starts: `seconds` times the extraction alone.
        forward = onnx_forward(extractor, size) if engine == "onnx" else base_forward(extractor, size, n_images)
        started = time.perf_counter()
        arrays = extract_all(LocalEngine(forward, size, batch_size), rows, settings, seed, size, key)
        seconds = time.perf_counter() - started
    if engine == "ray" or precision != "float32":
        # What ships is float32 and runs here: a float32 copy, compiled as the stage compiles its own.
        extractor, n_params = load_extractor(key, spec, seed)
    if engine != "local" or precision != "float32":
        # ... and runs in Keras, whatever engine extracted.
        forward = base_forward(extractor, size, n_images)
    cost = deployment_cost(extractor, size, forward)
    n_images = sum(len(arrays[f"y_{split}"]) for split in (*SPLITS, "train_aug"))

    arrays = {name: compact(array) if name.startswith("x_") else array for name, array in arrays.items()}
    write_features(
        key,
        arrays,
        {
            "backbone": key,
            "arch": spec["arch"],
            "image_size": size,
            "weights": spec["weights"],
            "precision": precision,
            # Where the precision and the engine came from: the same params.yaml can resolve differently on
            # another machine, and its numbers differ for that reason.
            "precision_setting": f"{source}: {setting}",
            "precision_reason": precision_reason,
            "feature_dim": int(arrays["x_train"].shape[1]),
            "params": int(n_params),
            "images": n_images,
            "seconds": round(seconds, 2),
            "images_per_second": round(n_images / seconds, 1),
            "engine": engine,
            "engine_setting": f"features.engine: {settings['engine']}",
            "engine_reason": engine_reason,
        }
        | cost,
    )
    print(
        f"{key}: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s, {precision}, {engine}: "
        f"{engine_reason})",
        file=sys.stderr,
    )


def extract_all(
    engine: Engine, rows: dict[str, Any], settings: dict[str, Any], seed: int, size: int, key: str
) -> dict[str, np.ndarray]:
    """Every array of the cache: each split's features and labels, and the augmented views' (maybe none)."""
    arrays = extract_splits(engine, rows, key)
    views, batch_size = settings["views"], settings["batch_size"]
    if views:
        augmenter = augmentation_layers(settings["augment"], seed)
        arrays["x_train_aug"], arrays["y_train_aug"] = extract_views(
            engine, augmenter, rows["train"], views, size, batch_size, f"{key} {views} views"
        )
    else:
        arrays["x_train_aug"] = np.zeros((0, arrays["x_train"].shape[1]), np.float32)
        arrays["y_train_aug"] = np.zeros(0, arrays["y_train"].dtype)
    return arrays


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.features BACKBONE_KEY")
    main(sys.argv[1])

"""Stage features@<backbone>: run the frozen ImageNet base once over every image and cache pooled features.

This is what makes the pipeline cheap: the classic recipe pushes every image through the frozen base in
every epoch; here each image goes through once (plus `features.views` augmented copies of training
images) and the head then trains on the cached arrays in seconds.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from tlpipe.datasets import SPLITS, augmentation_layers, read_manifest, split_rows
from tlpipe.errors import PipelineError, stage_main
from tlpipe.extraction import (
    base_forward,
    bfloat16_notice,
    deployment_cost,
    extract_splits,
    extract_views,
    load_extractor,
)
from tlpipe.feature_cache import compact, write_features
from tlpipe.params import extraction_precision, load_params
from tlpipe.runtime import seed_everything


@stage_main
def main(key: str) -> None:
    params = load_params()
    if key not in params["backbones"]:
        raise PipelineError(f"backbone {key!r} is not in params.yaml backbones: {', '.join(params['backbones'])}")
    spec, settings, seed = params["backbones"][key], params["features"], params["seed"]
    precision = extraction_precision(params, key)
    seed_everything(seed)
    if notice := bfloat16_notice(precision):
        print(f"{key}: {notice}", file=sys.stderr)

    manifest = read_manifest()
    extractor, n_params = load_extractor(key, spec, seed, precision)
    size, batch_size, views = spec["image_size"], settings["batch_size"], settings["views"]
    rows = {split: split_rows(manifest, split) for split in SPLITS}
    forward = base_forward(extractor, size, n_images=sum(map(len, rows.values())) + views * len(rows["train"]))

    started = time.perf_counter()
    arrays = extract_splits(forward, rows, size, batch_size, key)
    if views:
        augmenter = augmentation_layers(settings["augment"], seed)
        desc = f"{key} {views} views"
        arrays["x_train_aug"], arrays["y_train_aug"] = extract_views(
            forward, augmenter, rows["train"], views, size, batch_size, desc
        )
    else:
        arrays["x_train_aug"] = np.zeros((0, arrays["x_train"].shape[1]), np.float32)
        arrays["y_train_aug"] = np.zeros(0, arrays["y_train"].dtype)
    seconds = time.perf_counter() - started
    n_images = sum(len(arrays[f"y_{split}"]) for split in (*SPLITS, "train_aug"))
    if precision == "float32":
        cost = deployment_cost(extractor, size, forward)
    else:  # what ships is float32: a float32 copy, compiled as the stage compiled its own
        shipped = load_extractor(key, spec, seed)[0]
        cost = deployment_cost(shipped, size, base_forward(shipped, size, n_images))

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
            "feature_dim": int(arrays["x_train"].shape[1]),
            "params": int(n_params),
            "images": n_images,
            "seconds": round(seconds, 2),
            "images_per_second": round(n_images / seconds, 1),
        }
        | cost,
    )
    print(
        f"{key}: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s, {precision})", file=sys.stderr
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.features BACKBONE_KEY")
    main(sys.argv[1])

"""Stage features@<backbone>: run the frozen ImageNet base once over every image and cache pooled features.

This is what makes the pipeline cheap: the classic recipe pushes every image through the frozen base in
every epoch; here each image goes through once (plus `augment.views` augmented copies of training images)
and the head then trains on the cached arrays in seconds.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from stages.backbones import build_extractor, get_backbone
from stages.common import FEATURES_DIR, PipelineError, atomic_dir, seed_everything, stage_main, write_json
from stages.datasets import SPLITS, augmentation_layers, image_dataset, read_manifest, split_rows
from stages.params import load_params, resolve_weights


def load_extractor(key: str, spec: dict[str, Any], seed: int = 0) -> tuple[Any, int]:
    """(extractor, number of backbone parameters), with a clear error when the weights do not fit."""
    backbone = get_backbone(spec["arch"])
    weights = resolve_weights(spec["weights"], backbone.named_weights)
    try:
        extractor, base = build_extractor(spec["arch"], spec["image_size"], weights, seed)
    except Exception as error:  # Keras raises a bare Exception when a weights download fails
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if weights in backbone.named_weights and "fetch failure" in first_line:
            raise PipelineError(
                f"cannot download the {weights} weights of {spec['arch']} ({first_line}); without internet, set "
                f"backbones.{key}.weights to a local Keras weights file, or to null for random initialisation"
            ) from None
        raise PipelineError(
            f"cannot build {spec['arch']} with backbones.{key}.weights={spec['weights']!r}: {first_line}"
        ) from None
    return extractor, base.count_params()


def extract(forward: Callable[[Any], Any], dataset: Any, total: int, desc: str) -> np.ndarray:
    """Run `forward` over every batch of `dataset`, in order."""
    chunks = []
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=2.0) as progress:
        for batch in dataset:
            chunks.append(forward(batch).numpy())
            progress.update(len(chunks[-1]))
    return np.concatenate(chunks)


def compact(features: np.ndarray) -> np.ndarray:
    """float16 when it keeps every value to 1e-3 of the largest (it does for ImageNet weights), else float32.

    Halving the cache costs nothing in accuracy for real weights; randomly initialised bases can produce
    activations so small that float16 would flush them to zero.
    """
    scale = float(np.abs(features).max(initial=0.0))
    halved = features.astype(np.float16)
    if 0.0 < scale < 6.0e4 and float(np.abs(halved - features).max()) <= 1e-3 * scale:
        return halved
    return features.astype(np.float32)


@stage_main
def main(key: str) -> None:
    params = load_params()
    if key not in params["backbones"]:
        raise PipelineError(f"backbone {key!r} is not in params.yaml backbones: {', '.join(params['backbones'])}")
    spec = params["backbones"][key]
    seed_everything(params["seed"])
    import tensorflow as tf

    manifest = read_manifest()
    extractor, n_params = load_extractor(key, spec, params["seed"])
    # Calling the model inside tf.function skips model.predict's per-call overhead (up to 2x on CPU).
    plain = tf.function(lambda images: extractor(images, training=False))
    size, batch_size = spec["image_size"], params["features"]["batch_size"]

    arrays: dict[str, np.ndarray] = {}
    n_images, started = 0, time.perf_counter()
    for split in SPLITS:
        rows = split_rows(manifest, split)
        dataset = image_dataset(list(rows["path"]), size, batch_size)
        arrays[f"x_{split}"] = compact(extract(plain, dataset, len(rows), f"{key} {split}"))
        arrays[f"y_{split}"] = rows["label_index"].to_numpy()
        n_images += len(rows)

    views = params["augment"]["views"]
    train_rows = split_rows(manifest, "train")
    if views:
        augmenter = augmentation_layers(params["augment"], params["seed"])
        augmented = tf.function(lambda images: extractor(augmenter(images, training=True), training=False))
        dataset = image_dataset(list(train_rows["path"]), size, batch_size)
        arrays["x_train_aug"] = compact(np.concatenate(
            [extract(augmented, dataset, len(train_rows), f"{key} view {v + 1}/{views}") for v in range(views)]
        ))
        n_images += views * len(train_rows)
    else:
        arrays["x_train_aug"] = np.zeros((0, arrays["x_train"].shape[1]), arrays["x_train"].dtype)
    arrays["y_train_aug"] = np.tile(train_rows["label_index"].to_numpy(), views)
    seconds = time.perf_counter() - started

    with atomic_dir(FEATURES_DIR / key) as out_dir:
        np.savez(out_dir / "features.npz", **arrays)
        write_json(
            out_dir / "meta.json",
            {
                "backbone": key,
                "arch": spec["arch"],
                "image_size": size,
                "weights": spec["weights"],
                "feature_dim": int(arrays["x_train"].shape[1]),
                "params": int(n_params),
                "images": n_images,
                "seconds": round(seconds, 2),
                "images_per_second": round(n_images / seconds, 1),
            },
        )
    print(f"{key}: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.features BACKBONE_KEY")
    main(sys.argv[1])

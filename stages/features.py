"""Stage features@<backbone>: run the frozen ImageNet base once over every image and cache pooled features.

This is what makes the pipeline cheap: the classic recipe pushes every image through the frozen base in
every epoch; here each image goes through once (plus `augment.views` augmented copies of training images)
and the head then trains on the cached arrays in seconds.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stages import progress
from stages.backbones import build_extractor, get_backbone
from stages.common import (
    FEATURES_DIR, PipelineError, atomic_dir, first_line, seed_everything, stage_main, write_json,
)
from stages.datasets import SPLITS, augmentation_layers, image_dataset, read_manifest, split_rows
from stages.models import inference_function
from stages.params import extraction_precision, load_params, resolve_weights


def load_extractor(
    key: str, spec: dict[str, Any], seed: int = 0, precision: str = "float32"
) -> tuple[Any, int]:
    """(extractor, number of backbone parameters), with a clear error when the weights do not fit."""
    backbone = get_backbone(spec["arch"])
    weights = resolve_weights(spec["weights"], backbone.named_weights)
    try:
        extractor, base = build_extractor(spec["arch"], spec["image_size"], weights, seed, precision)
    except Exception as error:  # Keras raises a bare Exception when a weights download fails
        reason = first_line(error)
        if weights in backbone.named_weights and "fetch failure" in reason:
            raise PipelineError(
                f"cannot download the {weights} weights of {spec['arch']} ({reason}); without internet, set "
                f"backbones.{key}.weights to a local Keras weights file, or to null for random initialisation"
            ) from None
        raise PipelineError(
            f"cannot build {spec['arch']} with backbones.{key}.weights={spec['weights']!r}: {reason}"
        ) from None
    return extractor, base.count_params()


def bfloat16_notice(precision: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """A warning when bfloat16 would be emulated: no GPU, and a Linux CPU without AVX512_BF16 or AMX."""
    import tensorflow as tf

    if precision != "bfloat16" or tf.config.list_physical_devices("GPU") or not cpuinfo.is_file():
        return None
    if re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo.read_text(errors="replace")):
        return None
    return ("this CPU has no bfloat16 arithmetic (AVX512_BF16 or AMX), so bfloat16 extraction may be slower "
            "than float32; consider features.precision: float32")


def traced(function: Callable[[Any], Any], image_size: int) -> Callable[[Any], Any]:
    """`function` (images -> tensor) as a tf.function traced once for any batch size, variables kept live.

    For the augmentation, whose random layers keep their seed state in variables; the frozen base goes
    through models.inference_function instead, which turns its weights into constants.
    """
    import tensorflow as tf

    compiled = tf.function(function, input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    compiled.get_concrete_function()
    return compiled


def base_forward(extractor: Any, image_size: int) -> Callable[[Any], Any]:
    """The extractor's forward pass as the stage runs it: weights as constants (models.inference_function)."""
    return inference_function(lambda images: extractor(images, training=False), (None, image_size, image_size, 3))


def extract(
    forward: Callable[[Any], Any], paths: list[str], image_size: int, batch_size: int, desc: str
) -> np.ndarray:
    """Features of the images in `paths`, in order.

    On CPU the next batch is decoded while the model runs over this one, on the same cores; that costs the
    forward pass only the decoding's own CPU time (see datasets.image_dataset).
    """
    features = []
    with progress.bar(len(paths), desc) as shown:
        for images in image_dataset(paths, image_size, batch_size):
            features.append(forward(images).numpy())
            shown.update(len(features[-1]))
    return np.concatenate(features)


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
    precision = extraction_precision(params, key)
    seed_everything(params["seed"])
    if notice := bfloat16_notice(precision):
        print(f"{key}: {notice}", file=sys.stderr)

    manifest = read_manifest()
    extractor, n_params = load_extractor(key, spec, params["seed"], precision)
    size, batch_size = spec["image_size"], params["features"]["batch_size"]
    plain = base_forward(extractor, size)

    # One pass over every split, in SPLITS order, then cut back into splits.
    rows = {split: split_rows(manifest, split) for split in SPLITS}
    started = time.perf_counter()
    every_image = extract(plain, [p for split in SPLITS for p in rows[split]["path"]], size, batch_size, key)
    ends = np.cumsum([len(rows[split]) for split in SPLITS])
    arrays: dict[str, np.ndarray] = {}
    for split, part in zip(SPLITS, np.split(every_image, ends[:-1])):
        arrays[f"x_{split}"] = compact(part)
        arrays[f"y_{split}"] = rows[split]["label_index"].to_numpy()
    n_images = len(every_image)

    views = params["augment"]["views"]
    train_paths = list(rows["train"]["path"])
    if views:
        augmenter = augmentation_layers(params["augment"], params["seed"])
        augment = traced(lambda images: augmenter(images, training=True), size)
        arrays["x_train_aug"] = compact(
            extract(lambda images: plain(augment(images)), train_paths * views, size, batch_size, f"{key} {views} views")
        )
        n_images += views * len(train_paths)
    else:
        arrays["x_train_aug"] = np.zeros((0, arrays["x_train"].shape[1]), arrays["x_train"].dtype)
    arrays["y_train_aug"] = np.tile(rows["train"]["label_index"].to_numpy(), views)
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
                "precision": precision,
                "feature_dim": int(arrays["x_train"].shape[1]),
                "params": int(n_params),
                "images": n_images,
                "seconds": round(seconds, 2),
                "images_per_second": round(n_images / seconds, 1),
            },
        )
    print(f"{key}: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s, {precision})", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.features BACKBONE_KEY")
    main(sys.argv[1])

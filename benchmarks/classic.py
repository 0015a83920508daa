"""The classic tutorial recipe, for comparison: `python -m benchmarks.classic BACKBONE_KEY [--epochs 10]`.

Run in a pipeline project after `dvc repro prepare`. On the same splits as the pipeline, it trains a new head
on the frozen base with augmentation on the fly, so every image goes through the base again in every step of
every epoch (the tutorial's RMSprop, 1e-4, dropout 0.2, batch 32), then prints the test accuracy as JSON.
It decodes through the pipeline's own `tlpipe.datasets.image_dataset`, so that the two differ only in how
often each image goes through the base; `--autotune` uses tf.data's autotuner as the keras.io examples do.
The benchmark times the whole process, Python and TensorFlow start-up included, as it times the stages.
It is a step of `python -m benchmarks.benchmark`, which records its results; it writes none itself.
"""

from __future__ import annotations

import argparse
import json

from tlpipe.backbones import build_extractor, get_backbone
from tlpipe.datasets import augmentation_layers, image_dataset, read_manifest, split_rows
from tlpipe.params import load_params, resolve_weights
from tlpipe.runtime import seed_everything


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classic", description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a key of params.yaml backbones")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="decode with tf.data's AUTOTUNE, as the keras.io examples do, instead of the pipeline's settings",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    params = load_params()
    seed_everything(params["seed"])
    import keras

    spec = params["backbones"][args.backbone]
    size = spec["image_size"]
    extractor, _ = build_extractor(
        spec["arch"], size, resolve_weights(spec["weights"], get_backbone(spec["arch"]).named_weights)
    )
    inputs = keras.Input((size, size, 3))
    x = augmentation_layers(params["finetune"]["augment"], params["seed"])(inputs)
    x = extractor(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss="binary_crossentropy", metrics=["accuracy"])

    manifest = read_manifest()
    batches = {}
    for split in ("train", "val", "test"):
        rows = split_rows(manifest, split)
        shuffle_seed = params["seed"] if split == "train" else None
        batches[split] = image_dataset(
            list(rows["path"]),
            size,
            32,
            rows["label_index"].to_numpy(),
            shuffle_seed,
            autotune=True if args.autotune else None,  # None: the pipeline's own choice
        )
    model.fit(batches["train"], validation_data=batches["val"], epochs=args.epochs, verbose=0)
    _, accuracy = model.evaluate(batches["test"], verbose=0)
    print(json.dumps({"backbone": args.backbone, "epochs": args.epochs, "accuracy": round(float(accuracy), 4)}))


if __name__ == "__main__":
    main()

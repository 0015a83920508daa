"""Stage crossval@<backbone>: repeated stratified k-fold of the head on the cached train+val features.

Writes metrics/crossval/<backbone>.json (cv_accuracy_mean, cv_accuracy_std: a second estimate that does not
hang on one test split) and reports/crossval/<backbone>/out_of_fold.csv (each image's out-of-fold
probabilities, averaged over the repeats).

A dataset with fewer train+val images in some class than crossval.folds is not folded: the stage says so in
one line and writes the image list without probabilities and no scores, so the rest of the pipeline runs.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from tlpipe.crossvalidation import cross_validate, fold_shortage
from tlpipe.datasets import read_classes, read_manifest, split_rows
from tlpipe.errors import stage_main
from tlpipe.feature_cache import load_features
from tlpipe.files import atomic_path, write_json
from tlpipe.params import load_params
from tlpipe.paths import crossval_metrics, out_of_fold
from tlpipe.runtime import seed_everything


@stage_main
def main(key: str) -> None:
    params = load_params()
    classes = read_classes()
    manifest = read_manifest()
    features = load_features(key)
    x = np.concatenate([features["x_train"], features["x_val"]]).astype(np.float32)
    y = np.concatenate([features["y_train"], features["y_val"]])
    rows = pd.concat([split_rows(manifest, "train"), split_rows(manifest, "val")], ignore_index=True)
    table = pd.DataFrame({"path": rows["path"], "split": rows["split"], "actual": [classes[i] for i in y]})
    if shortage := fold_shortage(y, classes, params["crossval"]["folds"]):
        with atomic_path(out_of_fold(key)) as tmp:
            table.to_csv(tmp, index=False)
        write_json(crossval_metrics(key), {})
        print(f"{key}: cross-validation skipped: {shortage}", file=sys.stderr)
        return
    seed_everything(params["seed"])
    started = time.perf_counter()
    result = cross_validate(
        x, y, classes, params["train"], params["crossval"], params["data"]["val_fraction"], params["seed"]
    )
    seconds = time.perf_counter() - started
    for index, name in enumerate(classes):
        table[f"probability_{name}"] = result.out_of_fold[:, index].round(6)
    with atomic_path(out_of_fold(key)) as tmp:
        table.to_csv(tmp, index=False)
    summary = result.summary()
    write_json(crossval_metrics(key), summary)
    runs = f"{params['crossval']['folds']} folds x {params['crossval']['repeats']} repeats"
    print(
        f"{key}: cross-validated accuracy {summary['cv_accuracy_mean']:.4f} ± {summary['cv_accuracy_std']:.4f} "
        f"({runs} on {len(y)} images, {seconds:.1f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.crossval BACKBONE_KEY")
    main(sys.argv[1])

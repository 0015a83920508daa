"""Stage crossval@<backbone>: repeated stratified k-fold of the head on the cached train+val features.

Writes metrics/crossval/<backbone>.json (cv_accuracy_mean, cv_accuracy_std: a second estimate that does not
hang on one test split; which folds and repeats ran, and why fewer than crossval.folds; for the Keras head,
the median epoch early stopping kept) and reports/crossval/<backbone>/out_of_fold.csv (each image's
out-of-fold probabilities, averaged over the repeats).

The folds drop to what the smallest class allows, down to 2 (tlpipe.crossvalidation.fold_plan). A class with a
single train+val image is left out of the folds and named; its rows have no probabilities.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from tlpipe.crossvalidation import cross_validate, fold_plan
from tlpipe.datasets import read_classes, read_manifest, split_rows
from tlpipe.errors import stage_main
from tlpipe.feature_cache import load_features
from tlpipe.files import atomic_path, write_json
from tlpipe.params import load_params
from tlpipe.paths import crossval_metrics, out_of_fold
from tlpipe.runtime import seed_everything
from tlpipe.small_data import median_epochs


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
    repeats = params["crossval"]["repeats"]
    plan = fold_plan(y, classes, params["crossval"]["folds"])
    ran = {
        "folds": plan.folds,
        "repeats": repeats if plan.folds else 0,
        "folds_requested": plan.requested,
        "folds_note": plan.note,
        "unfolded_classes": ", ".join(plan.unfolded),
    }
    if not plan.folds:
        with atomic_path(out_of_fold(key)) as tmp:
            table.to_csv(tmp, index=False)
        write_json(crossval_metrics(key), ran)
        print(f"{key}: cross-validation cannot run: {plan.note}", file=sys.stderr)
        return
    seed_everything(params["seed"])
    folded = plan.folded(y, classes)
    started = time.perf_counter()
    result = cross_validate(
        x[folded],
        y[folded],
        len(classes),
        params["train"],
        plan.folds,
        repeats,
        params["data"]["val_fraction"],
        params["seed"],
    )
    seconds = time.perf_counter() - started
    probabilities = np.full((len(y), len(classes)), np.nan)
    probabilities[folded] = result.out_of_fold
    for index, name in enumerate(classes):
        table[f"probability_{name}"] = probabilities[:, index].round(6)
    with atomic_path(out_of_fold(key)) as tmp:
        table.to_csv(tmp, index=False)
    summary = result.summary() | ran
    if result.best_epochs:
        summary["best_epoch_median"] = median_epochs(result.best_epochs)
    write_json(crossval_metrics(key), summary)
    note = f"; {plan.note}" if plan.note else ""
    print(
        f"{key}: cross-validated accuracy {summary['cv_accuracy_mean']:.4f} ± {summary['cv_accuracy_std']:.4f} "
        f"({plan.folds} folds x {repeats} repeats of the {params['train']['head']} head on {int(folded.sum())} "
        f"images, {seconds:.1f} s{note})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.crossval BACKBONE_KEY")
    main(sys.argv[1])

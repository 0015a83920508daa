"""The data audit over one backbone's cached features: duplicates, train/test leakage, likely label errors and
outliers. stages/audit.py writes what these functions find.

Images are handled in the feature cache's order (train, then val, then test, each in manifest order), so row i
of the features is image i everywhere here.

- Exact duplicates: identical file bytes (sha256). prepare writes converted images deterministically, so two
  identical source files stay identical.
- Near duplicates: cosine similarity of the L2-normalised pooled features at or above a threshold, searched
  exactly (every pair is scored) in blocks of rows, so memory grows with n, not n².
- Label issues: cleanlab's confident learning on the out-of-fold probabilities of the crossval stage.
- Outliers: cleanlab's OutOfDistribution (mean cosine distance to the k nearest training images).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.datasets import SPLITS, split_rows
from tlpipe.errors import PipelineError

LEAKAGE_MODES = ("report", "drop", "fail")
# Rows of the similarity matrix scored at once: BLOCK_ROWS x n float32 (at 30,000 images, 123 MB).
BLOCK_ROWS = 1024
# The most near-duplicate partners listed per image: more means the threshold matches ordinary look-alikes
# (or the weights are random), and an exhaustive list would outgrow memory. Counts still cover every pair.
MAX_PAIRS_PER_IMAGE = 50
# Neighbours whose mean distance scores an outlier: cleanlab's default, fewer when training is smaller.
OUTLIER_NEIGHBOURS = 10
# The rows of sklearn's neighbour search held at once (MB): keeps the outlier search inside the audit's
# memory budget at 30,000 images (sklearn's default is 1024).
NEIGHBOUR_MEMORY_MB = 256
LABEL_ISSUE_COLUMNS = [
    "path",
    "split",
    "given_label",
    "suggested_label",
    "label_quality",
    "suggested_probability",
    "is_label_issue",
]


@dataclass(frozen=True)
class Images:
    """The audited images in feature-cache order."""

    paths: list[str]
    splits: np.ndarray  # "train" | "val" | "test"
    labels: np.ndarray  # class index
    digests: list[str] = field(default_factory=list)  # sha256 of each file, from the manifest

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame) -> Images:
        rows = pd.concat([split_rows(manifest, split) for split in SPLITS], ignore_index=True)
        return cls(list(rows["path"]), rows["split"].to_numpy(), rows["label_index"].to_numpy(), list(rows["sha256"]))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> Images:
        kept = lambda items: [item for item, keep in zip(items, mask) if keep]  # noqa: E731
        return Images(kept(self.paths), self.splits[mask], self.labels[mask], kept(self.digests))


def exact_pairs(digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j for every two images whose files are byte for byte the same."""
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        groups.setdefault(digest, []).append(index)
    pairs = [(a, b) for group in groups.values() for k, a in enumerate(group) for b in group[k + 1 :]]
    found = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return found[:, 0], found[:, 1]


def unit_rows(features: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (all-zero rows stay zero, similar to nothing)."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass(frozen=True)
class Similar:
    """What the blocked search finds at or above the threshold."""

    i: np.ndarray  # listed pairs, i < j: all of them, or an image's MAX_PAIRS_PER_IMAGE most similar later ones
    j: np.ndarray
    similarity: np.ndarray
    pairs: int  # every pair at or above the threshold, listed or not
    across: int  # of those, the pairs of two images in different splits
    leaked: np.ndarray  # per image: a test image with one in train or val


def similar_pairs(unit: np.ndarray, splits: np.ndarray, threshold: float, block_rows: int = BLOCK_ROWS) -> Similar:
    """Every pair of rows of `unit` whose cosine is at least `threshold`: counted and flagged exactly.

    Exact: each block of rows is multiplied with every row from its first on, so no pair is skipped, and only
    block_rows x n similarities exist at a time. Counts and leak flags cover every pair; the list keeps at most
    MAX_PAIRS_PER_IMAGE pairs per image (its most similar), so a threshold that matches everything (random
    weights, a too low value) cannot exhaust memory.
    """
    n = len(unit)
    codes = np.unique(splits, return_inverse=True)[1]
    is_test = splits == "test"
    leaked = np.zeros(n, dtype=bool)
    found_i, found_j, found_s = [], [], []
    pairs = across = 0
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        similarity = unit[start:stop] @ unit[start:].T  # column c is image start + c
        hits = similarity >= threshold
        hits &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]  # j > i: each pair once
        pairs += int(hits.sum())
        across += int((hits & (codes[start:stop, None] != codes[None, start:])).sum())
        rows_test, columns_test = is_test[start:stop, None], is_test[None, start:]
        leaked[start:] |= (hits & ~rows_test & columns_test).any(axis=0)
        leaked[start:stop] |= (hits & rows_test & ~columns_test).any(axis=1)
        rows, columns = np.nonzero(strongest(hits, similarity, MAX_PAIRS_PER_IMAGE))
        found_i.append(rows + start)
        found_j.append(columns + start)
        found_s.append(similarity[rows, columns])
    if not found_i:
        found_i, found_j, found_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    return Similar(np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s), pairs, across, leaked)


def strongest(hits: np.ndarray, similarity: np.ndarray, per_row: int) -> np.ndarray:
    """`hits` with each row cut to its `per_row` most similar columns."""
    crowded = np.flatnonzero(hits.sum(axis=1) > per_row)
    if len(crowded):
        masked = np.where(hits[crowded], similarity[crowded], -np.inf)
        top = np.argpartition(-masked, per_row - 1, axis=1)[:, :per_row]
        hits[crowded] = False
        hits[crowded[:, None], top] = True
    return hits


@dataclass(frozen=True)
class Duplicates:
    pairs: pd.DataFrame  # path, split and label of a and b, kind, similarity: exact first, then near by similarity
    counts: dict[str, int]  # exact and near duplicate pairs, within and across splits; leaked test images
    leaked: np.ndarray  # per image: a test image with an exact or near duplicate in train or val


def find_duplicates(
    images: Images, unit: np.ndarray, digests: list[str], threshold: float, classes: list[str]
) -> Duplicates:
    """Exact (same bytes) and near (cosine >= threshold, not exact) duplicates, and the test images they leak."""
    exact_i, exact_j = exact_pairs(digests)
    similar = similar_pairs(unit, images.splits, threshold)
    exact = set(zip(exact_i.tolist(), exact_j.tolist()))
    near = np.array([(i, j) not in exact for i, j in zip(similar.i.tolist(), similar.j.tolist())], dtype=bool)
    # Exact pairs the search also counted (identical features score 1, up to float rounding).
    counted = (unit[exact_i] * unit[exact_j]).sum(axis=1) >= threshold
    exact_across = images.splits[exact_i] != images.splits[exact_j]
    leaked = similar.leaked.copy()
    for i, j in zip(exact_i[exact_across], exact_j[exact_across]):
        if (images.splits[i] == "test") != (images.splits[j] == "test"):
            leaked[i if images.splits[i] == "test" else j] = True
    counts = {
        "exact_duplicate_pairs": len(exact_i),
        "exact_duplicate_pairs_across_splits": int(exact_across.sum()),
        "near_duplicate_pairs": similar.pairs - int(counted.sum()),
        "near_duplicate_pairs_across_splits": similar.across - int((counted & exact_across).sum()),
        "leaked_test_images": int(leaked.sum()),
    }
    a = np.concatenate([exact_i, similar.i[near]]).astype(np.int64)
    b = np.concatenate([exact_j, similar.j[near]]).astype(np.int64)
    kinds = ["exact"] * len(exact_i) + ["near"] * int(near.sum())
    similarity = np.concatenate([np.ones(len(exact_i), np.float32), similar.similarity[near]])
    paths, names = np.array(images.paths, dtype=object), np.array(classes, dtype=object)
    table = pd.DataFrame(
        {
            "path_a": paths[a],
            "split_a": images.splits[a],
            "label_a": names[images.labels[a]],
            "path_b": paths[b],
            "split_b": images.splits[b],
            "label_b": names[images.labels[b]],
            "kind": kinds,
            "similarity": similarity.round(4),
            "order": np.arange(len(a)),
        }
    )
    ordered = table.sort_values(["kind", "similarity", "order"], ascending=[True, False, True], ignore_index=True)
    return Duplicates(ordered.drop(columns="order"), counts, leaked)


def leaked_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The duplicate pairs joining a test image to a train or val image, as test_* and match_* columns."""
    rows = []
    for pair in pairs.itertuples(index=False):
        if pair.split_a == "test" and pair.split_b != "test":
            test, match = ("a", "b")
        elif pair.split_b == "test" and pair.split_a != "test":
            test, match = ("b", "a")
        else:
            continue
        rows.append(
            {
                "test_path": getattr(pair, f"path_{test}"),
                "test_label": getattr(pair, f"label_{test}"),
                "match_path": getattr(pair, f"path_{match}"),
                "match_split": getattr(pair, f"split_{match}"),
                "match_label": getattr(pair, f"label_{match}"),
                "kind": pair.kind,
                "similarity": pair.similarity,
            }
        )
    columns = ["test_path", "test_label", "match_path", "match_split", "match_label", "kind", "similarity"]
    return pd.DataFrame(rows, columns=columns)


def leakage_failure(leaks: pd.DataFrame, leaked: int, shown: int = 3) -> str:
    """The one line of audit.leakage: fail; `leaks` are the listed leaking pairs of the `leaked` test images."""
    first = leaks.drop_duplicates("test_path").head(shown)
    pairs = "; ".join(f"{row.test_path} ~ {row.match_path} ({row.kind})" for row in first.itertuples())
    more = f"; and {leaked - len(first)} more" if leaked > len(first) else ""
    return (
        f"audit.leakage is fail and {leaked} test images have a copy in train or val: {pairs}{more} "
        "(all in reports/audit/leakage.csv); remove them from the data, or set audit.leakage to drop"
    )


def label_issues(images: Images, probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Every image ranked by how likely its label is wrong, most likely first, with cleanlab's verdict.

    `probabilities` are out-of-fold (no image scored by a head that trained on it), one row per image.
    label_quality is the probability of the given label (cleanlab's self-confidence): low is suspect.
    is_label_issue is cleanlab's confident-learning flag (find_label_issues), which also weighs how often
    the model confuses each pair of classes, so it flags fewer than a plain cut-off would.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = images.labels
    with warnings.catch_warnings():
        # cleanlab warns once per class with few images that it may not flag all of that class's issues: on
        # small data that is every class, a line each, and it is what the audit's counts already say.
        warnings.filterwarnings("ignore", message="May not flag all label issues", category=UserWarning)
        flagged = find_label_issues(labels, probabilities)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    ranked = np.lexsort((np.arange(len(labels)), quality, ~flagged))  # flagged first, then by quality
    suggested = probabilities.argmax(axis=1)
    return pd.DataFrame(
        {
            "path": [images.paths[i] for i in ranked],
            "split": images.splits[ranked],
            "given_label": [classes[labels[i]] for i in ranked],
            "suggested_label": [classes[suggested[i]] for i in ranked],
            "label_quality": quality[ranked].round(4),
            "suggested_probability": probabilities[ranked, suggested[ranked]].round(4),
            "is_label_issue": flagged[ranked],
        }
    )


def outlier_scores(unit: np.ndarray, is_train: np.ndarray) -> np.ndarray:
    """cleanlab's out-of-distribution score of every image against the training images: 1 is typical, near 0
    is far from every training image. Training images are scored against the others (not themselves)."""
    import sklearn
    from cleanlab.outlier import OutOfDistribution

    n_train = int(is_train.sum())
    if n_train < 2:
        raise PipelineError("the audit's outlier search needs at least 2 training images")
    k = min(OUTLIER_NEIGHBOURS, n_train - 1)
    scores = np.empty(len(unit), dtype=np.float64)
    detector = OutOfDistribution(params={"k": k})
    with sklearn.config_context(working_memory=NEIGHBOUR_MEMORY_MB):
        scores[is_train] = detector.fit_score(features=unit[is_train], verbose=False)
        if (~is_train).any():
            scores[~is_train] = detector.score(features=unit[~is_train])
    return scores


def outlier_table(images: Images, scores: np.ndarray, classes: list[str]) -> pd.DataFrame:
    order = np.argsort(scores, kind="stable")
    return pd.DataFrame(
        {
            "path": [images.paths[i] for i in order],
            "split": images.splits[order],
            "label": [classes[images.labels[i]] for i in order],
            "outlier_score": scores[order].round(4),
        }
    )


def out_of_fold_probabilities(
    table: pd.DataFrame, images: Images, classes: list[str], source: Path
) -> np.ndarray | None:
    """The crossval stage's out-of-fold probabilities of `images`, in their order; None when crossval had too
    few images to fold and wrote none."""
    columns = [f"probability_{name}" for name in classes]
    if not any(column.startswith("probability_") for column in table.columns):
        return None
    missing = [column for column in ["path", *columns] if column not in table.columns]
    if missing:
        raise PipelineError(f"{source} lacks columns {missing}; rerun dvc repro crossval")
    by_path = table.set_index("path")[columns]
    absent = [path for path in images.paths if path not in by_path.index]
    if absent:
        raise PipelineError(f"{source} has no row for {absent[0]} ({len(absent)} missing); rerun dvc repro crossval")
    return by_path.loc[images.paths].to_numpy(dtype=np.float64)

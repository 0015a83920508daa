"""Every path the pipeline reads or writes, relative to the project root: the one place each is spelled.

dvc.yaml declares the same paths; tests/test_paths.py checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

# Written by the `validate` stage, which every other stage runs after (see stages/validate.py).
VALIDATED = Path("data/params.validated")
RAW_DIR = Path("data/raw")
RAW_ARCHIVE = RAW_DIR / "dataset.zip"
SOURCE_RECORD = RAW_DIR / "source.json"
PARTIAL_DIR = Path("data/.downloads")
PREPARED_DIR = Path("data/prepared")
MANIFEST = PREPARED_DIR / "manifest.csv"
CLASSES = PREPARED_DIR / "classes.json"
REPORT = PREPARED_DIR / "report.json"
FEATURES_DIR = Path("data/features")
MODELS_DIR = Path("models")
# What finetune trains, and what the `ship` stage then puts in place of the shipped model. Two paths, so
# that the shipped model stays in place (DVC deletes a stage's outputs before it runs the stage) while a
# new one trains. Files, not folders: no backbone key (models/<key>/) can take these names.
FINETUNED_MODEL = MODELS_DIR / "finetuned.keras"
FINETUNED_LABELS = MODELS_DIR / "finetuned.labels.json"
# The shipped model and its class names: what predict, evaluate_model and users load.
SHIPPED_MODEL = MODELS_DIR / "model.keras"
SHIPPED_LABELS = MODELS_DIR / "labels.json"
METRICS_DIR = Path("metrics")
SUMMARY_METRICS = METRICS_DIR / "summary.json"
FINETUNE_LOG_DIR = METRICS_DIR / "finetune"
EVALUATION_DIR = Path("reports/evaluation")
TRAINING_PICTURES_DIR = Path("reports/training")
CROSSVAL_METRICS_DIR = METRICS_DIR / "crossval"
CROSSVAL_DIR = Path("reports/crossval")
COMPARISON_DIR = Path("reports")
AUDIT_METRICS = METRICS_DIR / "audit.json"
MODEL_CARD = Path("reports/model_card.md")
# The shipped model in the formats of params.yaml `export.formats`, and how each agrees with it.
EXPORTS_DIR = Path("exports")
EXPORT_METRICS = METRICS_DIR / "export.json"
AUDIT_DIR = Path("reports/audit")
# The test images every evaluation leaves out: those the audit found copied in train or val, when
# audit.leakage is drop (else none). Under data/: a pipeline input to the evaluations, not a report.
DROPPED_TEST = Path("data/audit/dropped_test.csv")
# The name evaluate_model writes its evaluation under, beside the backbone keys.
SHIPPED_NAME = "model"


def features_dir(key: str) -> Path:
    return FEATURES_DIR / key


def head_model(key: str) -> Path:
    return MODELS_DIR / key / "head.keras"


def metrics_file(name: str) -> Path:
    """metrics/<backbone>.json, or metrics/model.json for the shipped model."""
    return METRICS_DIR / f"{name}.json"


def evaluation_dir(name: str) -> Path:
    return EVALUATION_DIR / name


def train_log_dir(key: str) -> Path:
    return METRICS_DIR / "train" / key


def training_picture(name: str) -> Path:
    return TRAINING_PICTURES_DIR / f"{name}.png"


def crossval_metrics(key: str) -> Path:
    """cv_accuracy_mean and cv_accuracy_std of a backbone's head (the crossval stage's DVC metric)."""
    return CROSSVAL_METRICS_DIR / f"{key}.json"


def out_of_fold(key: str) -> Path:
    """Every train and validation image's out-of-fold class probabilities (for the data audit)."""
    return CROSSVAL_DIR / key / "out_of_fold.csv"

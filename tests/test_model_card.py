"""The model card (tlpipe/model_card.py): every number it shows is the one in the file it names."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.helpers import PROJECT_ROOT
from tlpipe.export import FORMATS, KERAS
from tlpipe.files import megabytes
from tlpipe.model_card import AUDIT_COUNTS, CALIBRATION_METRICS, TEST_METRICS, CardInputs, number, render

GATE_METRICS = PROJECT_ROOT / "tests" / "gate" / "metrics"
ROW = re.compile(r"^\| [^|]*\(`(\w+)`\) \| ([^|]+) \|", re.MULTILINE)
FORMAT_ROW = re.compile(r"^\| `((?:models|exports)/[^`]+)` \|(.*)$", re.MULTILINE)
FORMAT_FILES = {f"exports/{spec.path}": name for name, spec in FORMATS.items()}


def assert_card_matches_its_sources(
    card: str, metrics: dict[str, Any], audit: dict[str, Any], exports: dict[str, Any]
) -> None:
    """Every table row of the card that names a metric key shows that key's value; every metric the card is
    meant to show is there; every format in metrics/export.json has its row, or its reason for failing."""
    formats = dict(FORMAT_ROW.findall(card))
    kept = {name for name in exports if isinstance(exports[name], dict) and name != "failed"} - exports["failed"].keys()
    assert {(KERAS if file == "models/model.keras" else FORMAT_FILES[file]) for file in formats} == kept
    for file, cells in formats.items():
        scores = exports[KERAS if file == "models/model.keras" else FORMAT_FILES[file]]
        size, accuracy, agreement, difference, latency = [cell.strip() for cell in cells.split("|")[2:7]]
        assert size == megabytes(scores["size_bytes"]) and latency == f"{scores['latency_ms_p50']:.1f} ms"
        expected = [number(scores[key]) for key in ("accuracy", "agreement", "max_probability_difference")]
        assert [accuracy, agreement, difference] == expected, file
    for name, reason in exports["failed"].items():
        assert f"- `{name}` was not exported: {reason}" in card
    shown = dict(ROW.findall(card))
    expected = [key for key, _ in (*TEST_METRICS, *CALIBRATION_METRICS, *AUDIT_COUNTS)]
    assert set(expected) <= shown.keys(), set(expected) - shown.keys()
    for key, value in shown.items():
        source = metrics if key in metrics else audit
        assert key in source, f"the card shows {key}, which neither metrics file has"
        assert value.strip() == number(source[key]), (key, value, source[key])


def inputs(**changes: Any) -> CardInputs:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    report = {
        "classes": ["cats", "dogs"],
        "counts": {"train": {"cats": 8, "dogs": 9}, "val": {"cats": 2, "dogs": 2}, "test": {"cats": 5, "dogs": 6}},
        "total": 32,
        "skipped": [],
        "converted": [],
    }
    base = {
        "params": params,
        "source": {"url": "https://example.com/pets.zip", "sha256": "ab" * 32, "size": 1234},
        "report": report,
        "metrics": json.loads((GATE_METRICS / "model.json").read_text()),
        "audit": json.loads((GATE_METRICS / "audit.json").read_text()),
        "exports": json.loads((GATE_METRICS / "export.json").read_text()),
    }
    return CardInputs(**(base | changes))


def test_every_number_on_the_card_is_the_one_in_its_source_file() -> None:
    card_inputs = inputs()
    card = render(card_inputs)
    assert_card_matches_its_sources(card, card_inputs.metrics, card_inputs.audit, card_inputs.exports)
    assert "sha256 `" + "ab" * 32 + "`" in card and "https://example.com/pets.zip" in card
    assert "| cats | 8 | 2 | 5 |" in card and "| dogs | 9 | 2 | 6 |" in card
    assert f"On {card_inputs.metrics['n_test']} test images" in card and "models/model.keras` | Keras 3" in card
    shipped = card_inputs.params["backbones"][card_inputs.params["model"]]
    assert f"`{shipped['arch']}` at {shipped['image_size']} px" in card and "top 30 layers unfrozen" in card


def test_a_wrong_number_would_be_caught() -> None:
    card_inputs = inputs()
    card = render(card_inputs).replace(f"| {number(card_inputs.metrics['accuracy'])} |", "| 0.5000 |", 1)
    try:
        assert_card_matches_its_sources(card, card_inputs.metrics, card_inputs.audit, card_inputs.exports)
    except AssertionError as error:
        assert "accuracy" in str(error)
    else:
        raise AssertionError("a changed accuracy went unnoticed")


def test_limitations_follow_the_audit_and_the_weights() -> None:
    audit = json.loads((GATE_METRICS / "audit.json").read_text())
    leaked = render(inputs(audit=audit | {"leaked_test_images": 3, "dropped_test_images": 0}))
    assert "3 test images have a copy in train or val: the test metrics may be inflated" in leaked
    dropped = render(inputs(audit=audit | {"leaked_test_images": 3, "dropped_test_images": 3}))
    assert "may be inflated" not in dropped
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["backbones"][params["model"]]["weights"] = None
    assert "randomly initialised (weights: null)" in render(inputs(params=params))
    assert "randomly initialised" not in render(inputs())


def test_a_frozen_shipment_its_reason_and_the_classes_left_out_are_on_the_card() -> None:
    metrics = json.loads((GATE_METRICS / "model.json").read_text())
    reason = "not fine-tuned: the validation split has 8 images for 2 classes"
    report = inputs().report | {"left_out": [{"class": "foxes", "usable_images": 2, "reason": "too few"}]}
    card_inputs = inputs(metrics=metrics | {"shipped": "frozen", "shipped_reason": reason}, report=report)
    card = render(card_inputs)
    arch = card_inputs.params["backbones"][card_inputs.params["model"]]["arch"]
    assert card.startswith(f"# Model card: `image-classifier` ({arch} frozen, with its head,")
    assert f"- Shipped (`shipped`: frozen): {reason}." in card
    assert "1 classes left out as too small (`foxes`): the model does not know them" in card
    logistic = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    logistic["train"]["head"] = "logistic"
    assert "a linear probe: multinomial logistic regression" in render(inputs(params=logistic))
    keras = logistic | {"train": logistic["train"] | {"head": "keras"}}
    assert "early stopping with patience" in render(inputs(params=keras))


def test_the_card_says_whether_fine_tuning_ran_on_cached_activations() -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for views in (0, 3):
        params["finetune"]["cached_views"] = views
        card = render(inputs(params=params))
        assert ("3 augmented views" in card) == (views == 3)
        assert ("every epoch on the images" in card) == (views == 0)
    del params["finetune"]["cached_views"]  # a params.yaml from before the option: it trained on the images
    assert "every epoch on the images" in render(inputs(params=params))

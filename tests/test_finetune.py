"""Fine-tuning pieces: which layers unfreeze, and a shipped EfficientNet that loads in a fresh process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import PROJECT_ROOT, run
from tlpipe.backbones import build_base
from tlpipe.errors import PipelineError
from tlpipe.finetuning import ship_model, unfreeze_top
from tlpipe.models import build_head, save_model

AUGMENT = {"views": 0, "flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}


def trainable_names(base) -> list[str]:
    return [layer.name for layer in base.layers if layer.trainable and layer.weights]


def test_unfreeze_a_count_of_top_layers_keeps_batch_norm_frozen() -> None:
    import keras

    base = build_base("MobileNetV2", 32, None)
    assert unfreeze_top(base, 10) == 10
    top = base.layers[-10:]
    assert all(layer.trainable for layer in top if not isinstance(layer, keras.layers.BatchNormalization))
    assert not any(layer.trainable for layer in base.layers[:-10])
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert "Conv_1" in trainable_names(base) and "block_1_expand" not in trainable_names(base)


def test_unfreeze_from_a_block_name() -> None:
    base = build_base("VGG16", 32, None)
    unfreeze_top(base, "block5")
    assert trainable_names(base) == ["block5_conv1", "block5_conv2", "block5_conv3"]


def test_unknown_block_name_lists_the_blocks() -> None:
    base = build_base("VGG16", 32, None)
    with pytest.raises(PipelineError, match=r"finetune.unfreeze: no layer of vgg16 starts with 'block9'; .*block5"):
        unfreeze_top(base, "block9")


@pytest.mark.slow
def test_shipped_efficientnet_takes_any_size_and_loads_in_a_fresh_process(tmp_path: Path) -> None:
    spec = {"arch": "EfficientNetB0", "image_size": 32, "weights": None}
    features = np.random.default_rng(0).normal(size=(20, 1280)).astype("float32")
    head = build_head(features, 2, dropout=0.1, hidden_units=0)
    model, _ = ship_model("effnet", spec, head, AUGMENT, seed=0)
    image = np.random.default_rng(1).uniform(0, 255, (1, 45, 70, 3)).astype("float32")
    expected = model.predict(image, verbose=0)
    save_model(model, tmp_path / "model.keras")
    np.save(tmp_path / "image.npy", image)
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
        "from tlpipe.models import load_model\n"
        f"model = load_model({str(tmp_path / 'model.keras')!r})\n"
        f"print(float(model.predict(np.load({str(tmp_path / 'image.npy')!r}), verbose=0)[0, 0]))\n"
    )
    result = run([sys.executable, "-c", script], tmp_path)
    assert float(result.stdout.split()[-1]) == pytest.approx(float(expected[0, 0]), rel=1e-5)

"""Stage model_card: reports/model_card.md for the shipped model, from the pipeline's own outputs (see
tlpipe/model_card.py). DVC regenerates it whenever the model, its metrics, its exports, the data or the audit
change."""

from __future__ import annotations

from tlpipe.errors import stage_main
from tlpipe.files import read_json, write_text
from tlpipe.model_card import CardInputs, render
from tlpipe.params import audit_backbone, load_params
from tlpipe.paths import AUDIT_METRICS, EXPORT_METRICS, MODEL_CARD, REPORT, SHIPPED_NAME, SOURCE_RECORD, metrics_file


@stage_main
def main() -> None:
    params = load_params()
    # The card names the audited backbone: model's where audit.backbone is null.
    params["audit"] = params["audit"] | {"backbone": audit_backbone(params)}
    inputs = CardInputs(
        params=params,
        source=read_json(SOURCE_RECORD),
        report=read_json(REPORT),
        metrics=read_json(metrics_file(SHIPPED_NAME)),
        audit=read_json(AUDIT_METRICS),
        exports=read_json(EXPORT_METRICS),
    )
    write_text(MODEL_CARD, render(inputs))
    print(f"model card -> {MODEL_CARD}")


if __name__ == "__main__":
    main()

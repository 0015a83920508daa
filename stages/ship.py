"""Stage ship: put the fine-tuned model in place of the shipped one (models/model.keras, models/labels.json).

finetune writes models/finetuned.keras; this stage copies it, and its class names, onto the shipped paths,
each by an atomic rename. The shipped files are `persist` outputs in dvc.yaml, so DVC never deletes them
before a run: predict keeps working while a new model trains, and after a failed or interrupted fine-tune.
"""

from __future__ import annotations

import shutil
import sys

from tlpipe.errors import PipelineError, stage_main
from tlpipe.files import atomic_path, read_json, write_json
from tlpipe.paths import FINETUNED_LABELS, FINETUNED_MODEL, SHIPPED_LABELS, SHIPPED_MODEL


@stage_main
def main() -> None:
    if not FINETUNED_MODEL.is_file():
        raise PipelineError(f"{FINETUNED_MODEL} is missing; run dvc repro finetune")
    labels = read_json(FINETUNED_LABELS)
    with atomic_path(SHIPPED_MODEL) as tmp:
        shutil.copyfile(FINETUNED_MODEL, tmp)
    write_json(SHIPPED_LABELS, labels)
    print(f"shipped {labels['backbone']} fine-tuned as {SHIPPED_MODEL}", file=sys.stderr)


if __name__ == "__main__":
    main()

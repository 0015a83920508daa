"""Stage validate: check the whole of params.yaml before any other stage runs.

DVC deletes a stage's outputs before it runs the stage, so a mistake that the stage itself catches has
already cost its previous results. Every other stage runs after this one (fetch depends on its output), so
a bad parameter (`-S model=nonexistent`, `train.epochs=-5`, `backbones: {}`) stops `dvc repro` here, with
every earlier result still in place. The output's content never changes, so a valid change of parameters
reruns only the stages that read them.
"""

from __future__ import annotations

from tlpipe.errors import PipelineError, stage_main
from tlpipe.files import write_text
from tlpipe.params import load_params
from tlpipe.paths import VALIDATED


@stage_main
def main() -> None:
    try:
        load_params()
    except PipelineError as error:
        raise PipelineError(
            f"{error}\nNothing ran and no result was removed: fix params.yaml, or return to the committed one "
            "with `git checkout params.yaml`."
        ) from None
    write_text(VALIDATED, "params.yaml passed validation (tlpipe/params.py)\n")


if __name__ == "__main__":
    main()

"""Entry points of the pipeline: one module per `dvc.yaml` stage (plus the predict and check_metrics commands).

Each reads its part of params.yaml and writes its declared outputs; the work is done by the `tlpipe` library.
"""

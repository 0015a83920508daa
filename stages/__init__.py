"""Stages of the transfer-learning pipeline: one module per `dvc.yaml` stage."""

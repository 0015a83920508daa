"""Stages of the transfer-learning pipeline: one module per `dvc.yaml` stage."""
import os

# TensorFlow's start-up banners (oneDNN, CPU instruction sets) bury the stages' own one-line messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

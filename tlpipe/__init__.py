"""The library behind the pipeline's stages: every stage in `stages/` is a short recipe over these modules.

Each module has one job: `paths` names every file the pipeline writes, `feature_cache` owns the cached
features' format, `evaluation` writes an evaluation, `params` reads and validates params.yaml, and so on.
"""

import os

# TensorFlow's start-up banners (oneDNN, CPU instruction sets) bury the stages' own one-line messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

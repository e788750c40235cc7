"""recsys: multi-task, multimodal recommender (shared core: config, model blocks, metrics, run directory)."""

__version__ = "0.1.0"

"""What a script prints: hf_koleo's own lines at ``info``, other libraries' warnings, no load/save bars.

At the default level a run shows its progress bar, one line per prototype-statistics step and
per checkpoint, warnings, and its closing summary; accelerate's per-checkpoint INFO lines,
transformers' "Loading weights" / "Writing model shards" bars and the full statistics dictionaries
show only at ``debug`` (everything is in ``metrics.jsonl`` and TensorBoard anyway).
"""

from __future__ import annotations

import logging

from .training.arguments import LOG_LEVELS

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Console logging for a script: ``hf_koleo`` loggers at ``level``, every other library at
    warning (``debug``: everything at debug, progress bars on)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {level!r}")
    debug = level == "debug"
    root = logging.getLogger()
    if not root.handlers:  # a handler already there (pytest's, an application's) is kept
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("hf_koleo").setLevel(level.upper())
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.logging.set_verbosity(logging.DEBUG if debug else logging.WARNING)
    if debug:
        transformers.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
        datasets.enable_progress_bars()
    else:
        transformers.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        datasets.disable_progress_bars()


__all__ = ["LOG_LEVELS", "configure_logging"]

"""Launcher logging: our INFO lines, other libraries' warnings only."""

import logging

from absl import logging as absl_logging


def configure_logging() -> None:
    # Orbax and grain log every file operation at INFO through absl's logger.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("prm_jax").setLevel(logging.INFO)
    logging.getLogger("data_pipeline").setLevel(logging.INFO)

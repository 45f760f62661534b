"""Train and evaluate RetinaNet: ``python train.py --config configs/shapes.py --workdir DIR``.

Any config value can be overridden on the command line, e.g. ``--config.batch_size=16
--config.optim.base_lr=0.02``. Rerunning the same command resumes from the last complete
checkpoint in ``--workdir``. On a multi-host TPU / GPU cluster add ``--jax_distributed``
(calls ``jax.distributed.initialize()`` before anything touches the devices).
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/shapes.py", "Training configuration file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["workdir"])


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's INFO/DEBUG records (dozens per checkpoint); its warnings and errors pass."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs through absl (logger "absl"), so filter by source file, not logger name.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)  # "no TPU" notices
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from retinanet_jax import train_loop  # after distributed init: it creates device arrays

    logging.info("JAX %s: process %d of %d, %d devices", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count())
    train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

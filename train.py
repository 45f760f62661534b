"""Train and evaluate RetinaNet: ``python train.py --config configs/shapes.py --workdir DIR``.

Any config value can be overridden on the command line, e.g. ``--config.batch_size=16
--config.optim.base_lr=0.02``. Rerunning the same command resumes from the last complete
checkpoint in ``--workdir``.

Multi-process (TPU pod slice, multi-node GPU, several processes on one machine): the same
command runs in every process. Under ``srun`` (SLURM), ``mpirun`` (Open MPI) or on a multi-host
Cloud TPU slice ``jax.distributed.initialize()`` is called automatically; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. A plain single process
does nothing extra. See README "Multi-host".
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from retinanet_jax.backends.cpu import hostmem
from retinanet_jax.parallel import distributed  # no jax device work at import

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/shapes.py", "Training configuration file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
distributed.define_flags()  # --distributed, --coordinator_address, ... (see README)
flags.adopt_module_key_flags(distributed)  # list them in train.py --help
flags.mark_flags_as_required(["workdir"])


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's INFO/DEBUG records (dozens per checkpoint); its warnings and errors pass,
    except "did not provide metrics": orbax gives it on every save without metrics once a
    best-checkpoint metric is set, and steps without an evaluation are expected here."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        return record.levelno >= py_logging.WARNING and "did not provide metrics" not in record.getMessage()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs through absl (logger "absl"), so filter by source file, not logger name.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)  # "no TPU" notices
    import jax

    mode, options = distributed.from_flags()
    distributed.initialize(mode, options)  # before anything touches the devices
    from retinanet_jax.training import loop as train_loop  # after distributed init: it creates device arrays

    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # process 0 logs progress for everyone
    logging.info(
        "JAX %s: process %d of %d, %d devices (%d local)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )
    try:
        train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except BaseException as e:
        distributed.exit_on_error(e, options.heartbeat_timeout)  # returns on one process
        raise


if __name__ == "__main__":
    hostmem.reexec_with_hugepages()  # before jax: see retinanet_jax/hostmem.py
    app.run(main)

"""Multi-process start-up: when and how to call ``jax.distributed.initialize``.

JAX's own runtime is the distributed engine: one Python process per host (TPU pod slice) or
per GPU / node (SLURM, Open MPI), all running the same program on one global mesh. This module
only decides whether the current process is part of such a job and with which settings:

- explicit: ``coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``) plus ``num_processes``
  and ``process_id`` -- any launcher, including several processes on one machine;
- auto-detected (what ``jax.distributed.initialize()`` itself can read): SLURM ``srun`` with
  more than one task, Open MPI ``mpirun`` with more than one rank, a multi-host Cloud TPU slice;
- otherwise nothing happens: a plain single process never starts the coordination service.

Failure handling is JAX's: every process sends heartbeats to the coordination service (hosted
by process 0); when one stops (killed, crashed, preempted) the service tells the others, which
terminate with "Terminating process because the JAX distributed service detected fatal
errors" within ``heartbeat_timeout`` seconds instead of blocking in a collective forever.
``exit_on_error`` covers the other case, a Python exception on a subset of the processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Mapping

from absl import flags

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """Arguments of ``jax.distributed.initialize`` (``None`` = detected from the launcher).

    Timeouts (seconds):
      ``initialization_timeout``: how long processes wait for each other to connect at start
        (a pod's hosts may start minutes apart); jax's default.
      ``heartbeat_timeout``: a process that sent no heartbeat for this long is declared dead
        and every other process terminates. Heartbeats come from a C++ thread, so long
        compilations or input stalls do not delay them; 60 s bounds the time a dead peer
        can keep the rest of the job hanging (jax's default is 100 s).
      ``shutdown_timeout``: at a normal exit each process waits this long at a barrier for
        the others to finish too (they end within seconds of each other: the last
        checkpoint and evaluation are collective).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 60
    shutdown_timeout: int = 120


# Environment variables that ``jax.distributed.initialize()``'s cluster detection reads (jax's
# documented SLURM / Open MPI / Cloud TPU auto-detection); we read the same ones, through public
# channels only, to decide *whether* to call it. jax itself fills in the arguments.
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)  # all present: jax's "slurm" detection applies
OMPI_URI = "OMPI_MCA_orte_hnp_uri"  # present: jax's "ompi" detection applies (Open MPI <= 4)
TPU_WORKER_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # GKE TPU: one per host
GCE_METADATA = "http://{host}/computeMetadata/v1/instance/attributes/{key}"  # GCE TPU VMs


def detect_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """``"slurm"`` / ``"ompi"`` / ``"tpu"`` when a multi-process launcher started this process.

    Only launchers that ``jax.distributed.initialize()`` can read by itself count, and only
    with more than one process: a single SLURM task or ``mpirun -n 1`` is a plain process.
    """
    return _detect(environ)[0]


def launcher_processes(environ: Mapping[str, str] = os.environ) -> tuple[int | None, int | None]:
    """(process_id, num_processes) as the detected launcher reports them (``None``: unknown)."""
    return _detect(environ)[1:]


def _detect(environ: Mapping[str, str]) -> tuple[str | None, int | None, int | None]:
    if all(k in environ for k in SLURM_VARS):
        # SLURM_STEP_NUM_TASKS: the srun step's tasks; SLURM_NTASKS (what jax reads) is the
        # allocation's outside srun (an sbatch script) and the step's inside.
        n = _int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"]))
        if n > 1:
            return "slurm", _int(environ["SLURM_PROCID"], None), n
    if OMPI_URI in environ:
        n = _int(environ.get("OMPI_COMM_WORLD_SIZE"))
        if n > 1:
            return "ompi", _int(environ.get("OMPI_COMM_WORLD_RANK"), None), n
    n = _tpu_process_count(environ)
    if n > 1:
        return "tpu", _int(environ.get("TPU_WORKER_ID"), None), n
    return None, None, None


def _int(value: str | None, default: int | None = 0) -> int | None:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
    """libtpu installed and TPU chips attached (or ``JAX_FORCE_TPU_INIT``): what jax requires
    before its Cloud TPU detection applies. Checked without importing jax or libtpu."""
    import glob
    import importlib.util

    if "JAX_FORCE_TPU_INIT" in environ:
        return True
    if importlib.util.find_spec("libtpu") is None and not environ.get("TPU_LIBRARY_PATH"):
        return False
    # TPU chips appear as /dev/accel* (v2-v4) or VFIO groups (v5e and newer).
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _gce_metadata(key: str, environ: Mapping[str, str]) -> str | None:
    """A GCE instance attribute from the (public) metadata server; ``None`` when not there."""
    import urllib.error
    import urllib.request

    url = GCE_METADATA.format(host=environ.get("GCE_METADATA_IP", "metadata.google.internal"), key=key)
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()
    except urllib.error.HTTPError:  # reachable, but no such attribute
        return None


def _tpu_env(key: str, environ: Mapping[str, str]) -> str | None:
    """A TPU setting from the environment, else from the VM's ``tpu-env`` metadata."""
    if key in environ:
        return environ[key]
    for line in (_gce_metadata("tpu-env", environ) or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip().strip("'\"")
    return None


def _tpu_process_count(environ: Mapping[str, str]) -> int:
    """Hosts in this Cloud TPU slice (all slices of a multislice job), 0 when not on a Cloud
    TPU VM, from the same sources as jax's detection: ``TPU_PROCESS_ADDRESSES`` /
    ``TPU_WORKER_HOSTNAMES`` (GKE) or the ``worker-network-endpoints`` metadata (GCE TPU VM),
    times ``MEGASCALE_NUM_SLICES``."""
    if not _on_cloud_tpu_vm(environ):
        return 0
    workers = next((environ[k] for k in TPU_WORKER_LISTS if k in environ), None)
    try:
        if workers is None:
            if "TPU_SKIP_MDS_QUERY" in environ:  # jax skips the metadata server too
                return 0
            workers = _gce_metadata("worker-network-endpoints", environ)
            if workers is None:  # not a GCE TPU VM
                return 0
        slices = _int(_tpu_env("MEGASCALE_NUM_SLICES", environ), 1) or 1
    except OSError as e:  # metadata server unreachable, ...
        if workers is None:
            log.info("no GCE metadata server (%s): not a Cloud TPU slice", e)
            return 0
        log.warning("Cloud TPU VM: could not read MEGASCALE_NUM_SLICES (%s); assuming 1", e)
        slices = 1
    return len([w for w in workers.split(",") if w.strip()]) * slices


def plan(mode: str, options: DistributedOptions, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this process should call ``jax.distributed.initialize`` (``None``: it should not).

    ``mode``: ``"auto"`` (explicit settings or a detected launcher), ``"on"`` (always; jax
    detects what is unset and fails if it cannot) or ``"off"`` (never).
    """
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    coordinator = options.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
    explicit = coordinator is not None or options.num_processes is not None or options.process_id is not None
    if explicit:
        launcher = detect_launcher(environ)
        missing = [
            name
            for name, value in (
                ("--coordinator_address", coordinator),
                ("--num_processes", options.num_processes),
                ("--process_id", options.process_id),
            )
            if value is None
        ]
        if missing and launcher is None:
            raise ValueError(
                f"multi-process settings are incomplete: set {', '.join(missing)} "
                "too (or launch with srun / mpirun / on a TPU slice)"
            )
        if options.num_processes is not None and options.num_processes < 1:
            raise ValueError(f"--num_processes must be >= 1, got {options.num_processes}")
        if (
            options.num_processes is not None
            and options.process_id is not None
            and not 0 <= options.process_id < options.num_processes
        ):
            raise ValueError(
                f"--process_id={options.process_id} must be in "
                f"0..{options.num_processes - 1} (--num_processes)"
            )
        if options.num_processes == 1 and mode == "auto":
            return None
        return "explicit settings" + (f" + {launcher}" if launcher else "")
    if mode == "on":
        return "--distributed=on"
    return detect_launcher(environ)


# What initialize() started: jax.distributed has no public getter for the process numbers,
# and jax.process_count() / jax.process_index() create the backend, which waits until every
# process does the same.
_started: dict = {}


def initialize(mode: str = "auto", options: DistributedOptions = DistributedOptions()) -> bool:
    """Calls ``jax.distributed.initialize`` if :func:`plan` says so; True if it did.

    Must run before anything touches the devices (``jax.devices()``, any computation).
    """
    reason = plan(mode, options)
    if reason is None:
        return False
    import jax

    # Cross-process collectives of the CPU backend (tests, CPU clusters) need an
    # implementation; gloo is jax's default today, keep a user's explicit choice.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    ids = list(options.local_device_ids) if options.local_device_ids is not None else None
    log.info(
        "jax.distributed.initialize (%s): coordinator %s, process %s of %s; heartbeat timeout %d s",
        reason,
        options.coordinator_address or "auto",
        "auto" if options.process_id is None else options.process_id,
        options.num_processes or "auto",
        options.heartbeat_timeout,
    )
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address,
        num_processes=options.num_processes,
        process_id=options.process_id,
        local_device_ids=ids,
        initialization_timeout=options.initialization_timeout,
        heartbeat_timeout_seconds=options.heartbeat_timeout,
        shutdown_timeout_seconds=options.shutdown_timeout,
    )
    pid, count = options.process_id, options.num_processes
    if pid is None or count is None:  # jax took them from the launcher: so do we
        launcher_id, launcher_count = launcher_processes()
        pid = launcher_id if pid is None else pid
        count = launcher_count if count is None else count
    _started.update(process_id=pid, num_processes=count)
    return True


def is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` ran in this process (here or by the caller)."""
    import jax

    check = getattr(jax.distributed, "is_initialized", None)  # public; older jax lacks it
    return bool(_started) or (check is not None and check())


def process_info() -> tuple[int, int]:
    """(process_id, num_processes) of this job; (0, 1) when jax.distributed is not initialized.

    Does not create the backend when :func:`initialize` knows the numbers (explicit settings,
    SLURM, Open MPI); otherwise asks ``jax.process_index()`` / ``jax.process_count()``, which
    do (``train.py`` has created it before anything can fail).
    """
    if not is_initialized():
        return 0, 1
    pid, count = _started.get("process_id"), _started.get("num_processes")
    if pid is None or count is None:
        import jax

        pid, count = jax.process_index(), jax.process_count()
    return pid, count


def exit_on_error(exc: BaseException, heartbeat_timeout: int) -> None:
    """Report ``exc`` and leave at once when other processes are running (never returns then).

    A Python exception on some processes only (a corrupt image in one host's shard, a full
    disk) would otherwise park them at jax's shutdown barrier while the others wait in the
    next collective, until ``shutdown_timeout``. Exiting without the barrier stops this
    process's heartbeats, so the others terminate within ``heartbeat_timeout`` -- at once if
    this is process 0, which hosts the coordination service. Single process: returns.
    """
    process_id, num_processes = process_info()
    if num_processes <= 1:
        return
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(
        f"{text}\nprocess {process_id} of {num_processes} failed: "
        f"{type(exc).__name__}: {exc}\nExiting now without jax's shutdown barrier; the other "
        f"processes stop within the heartbeat timeout ({heartbeat_timeout} s).\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    logging.shutdown()
    os._exit(1)


# ----------------------------------------------------------------------------- flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines ``--distributed``, ``--coordinator_address``, ``--num_processes``,
    ``--process_id``, ``--local_device_ids`` and the three timeouts (used by ``train.py``)."""
    d = DistributedOptions
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum(
        "distributed",
        "auto",
        MODES,
        "auto: call jax.distributed.initialize() when the flags below are set or a "
        "multi-process launcher is detected (srun, mpirun, Cloud TPU slice); on: always; "
        "off: never.",
        **fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0's coordination service (the same "
        "for all processes); default: $JAX_COORDINATOR_ADDRESS or the launcher's.",
        **fv,
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the job.", **fv)
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.", **fv)
    flags.DEFINE_list(
        "local_device_ids",
        None,
        "Local accelerator ids this process uses, e.g. 0,1,2,3 "
        "(default: all; one per process under srun / mpirun on GPU).",
        **fv,
    )
    flags.DEFINE_integer(
        "initialization_timeout",
        d.initialization_timeout,
        "Seconds the processes wait for each other to connect at start-up.",
        **fv,
    )
    flags.DEFINE_integer(
        "heartbeat_timeout",
        d.heartbeat_timeout,
        "Seconds without a heartbeat after which a process counts as dead and all the others stop.",
        **fv,
    )
    flags.DEFINE_integer(
        "shutdown_timeout",
        d.shutdown_timeout,
        "Seconds a finished process waits at exit for the others.",
        **fv,
    )


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> tuple[str, DistributedOptions]:
    """(mode, options) from the parsed flags of :func:`define_flags`."""
    f = flag_values
    ids = f.local_device_ids
    try:
        ids = tuple(int(t) for t in ids) if ids else None
    except ValueError as e:
        raise ValueError(f"--local_device_ids must be integers, got {list(ids)}") from e
    return f.distributed, DistributedOptions(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
        local_device_ids=ids,
        initialization_timeout=f.initialization_timeout,
        heartbeat_timeout=f.heartbeat_timeout,
        shutdown_timeout=f.shutdown_timeout,
    )

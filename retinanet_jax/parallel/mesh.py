"""Device mesh, shardings and host -> device batch placement.

One ``jax.sharding.Mesh`` with axes ``("data", "model")`` serves one CPU, one GPU or a TPU pod
slice alike. The batch is split along ``data``; parameters (and every array shaped like them:
optimizer state, batch statistics) are replicated, or -- when the ``model`` axis is larger
than 1 -- sharded by a shape rule (``param_spec``). Under ``jax.jit`` XLA then inserts the
collectives, so a BatchNorm over a sharded batch sees the global batch and gradients are
summed over all devices without explicit ``pmean``.

Multi-host: the mesh spans every process's devices (``jax.devices()`` is global once
``jax.distributed.initialize()`` ran; see ``retinanet_jax.parallel.distributed``). Each process loads
only its own rows of the global batch (``local_batch_size``) and ``shard_batch`` assembles them
into one global array (``jax.make_array_from_process_local_data``); XLA's collectives then
cross processes as they cross devices. A ``model`` group must stay inside one process
(``check_process_layout``), so that each process's rows belong to its devices alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(
    data: int | None = None,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Mesh of shape ``(data, model)`` with axes ``("data", "model")``.

    ``data`` defaults to ``len(devices) // model``. With ``devices=None`` all global devices
    are used, laid out by ``mesh_utils`` so that ``model`` neighbours share fast links on TPU.
    """
    all_devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ValueError(f"model axis size must be >= 1, got {model}")
    if data is None:
        if len(all_devices) % model:
            raise ValueError(f"{len(all_devices)} devices do not divide into model={model}")
        data = len(all_devices) // model
    n = data * model
    if n > len(all_devices) or n < 1:
        raise ValueError(f"mesh data={data} x model={model} needs {n} devices, have {len(all_devices)}")
    if devices is None and n == len(all_devices):
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, model), devices=all_devices)
    else:
        grid = np.asarray(all_devices[:n], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def mesh_devices(num_devices: int | None = None) -> list[jax.Device] | None:
    """``num_devices`` of the global devices, the same number from every process (None = all).

    Taking the first ``num_devices`` of ``jax.devices()`` would leave later processes without
    devices (and without a share of the batch) in a multi-process run.
    """
    if not num_devices:
        return None
    count = jax.process_count()
    if num_devices % count or num_devices > jax.device_count():
        raise ValueError(
            f"config.mesh.num_devices={num_devices} must be a multiple of the "
            f"{count} processes and at most the {jax.device_count()} devices"
        )
    per_process = num_devices // count
    by_process: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [d for p in sorted(by_process) for d in by_process[p][:per_process]]


def check_process_layout(mesh: Mesh) -> None:
    """Raise if a ``data`` index has devices in several processes (a ``model`` group that
    spans processes): those processes would have to feed identical rows."""
    for row in np.asarray(mesh.devices).reshape(mesh.shape[DATA_AXIS], -1):
        if len({d.process_index for d in row}) > 1:
            raise ValueError(
                f"config.mesh.model={mesh.shape[MODEL_AXIS]} spans several processes; it must "
                f"divide each process's {jax.local_device_count()} devices"
            )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics, small params)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def param_spec(shape: Sequence[int], model_size: int) -> P:
    """The parameter sharding rule.

    Conv kernels (4-d, HWIO) whose output-channel count divides by the ``model`` axis size are
    split along that axis; everything else (biases, norm scales, scalars, odd channel counts
    such as a K-class logits conv) is replicated. With ``model_size == 1`` all is replicated.
    """
    if model_size > 1 and len(shape) == 4 and shape[-1] % model_size == 0:
        return P(None, None, None, MODEL_AXIS)
    return P()


def tree_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding`` per leaf of ``tree`` (arrays or ShapeDtypeStructs) by ``param_spec``.

    Applies equally to params, optimizer state (moments share the params' shapes) and
    batch statistics, so an optimizer moment lives where its parameter lives.
    """
    model_size = mesh.shape[MODEL_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), model_size)), tree)


def local_batch_size(global_batch_size: int, mesh: Mesh, name: str = "global batch") -> int:
    """Rows this process loads; checks the global batch splits evenly over ``data`` and over
    the processes. ``name`` (e.g. ``"config.batch_size"``) is what the error calls it."""
    data = mesh.shape[DATA_AXIS]
    if global_batch_size % data:
        raise ValueError(
            f"{name}={global_batch_size} is not divisible by the data axis ({data} = "
            f"{mesh.devices.size} devices / model {mesh.shape[MODEL_AXIS]})"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{name}={global_batch_size} is not divisible by the {jax.process_count()} processes"
        )
    return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global ``jax.Array``s split over ``data``.

    Each process passes its own rows (leading axis = global batch / process count); the
    global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        local_batch_size(value.shape[0] * jax.process_count(), mesh)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out

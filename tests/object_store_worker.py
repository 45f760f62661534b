"""``python tests/object_store_worker.py URL [--kill-after-step K] [--flush-interval S] -- FLAGS...``

Runs ``train.py`` as ``python train.py FLAGS`` would, in this process, with every GCS
client pointed at the emulator at URL and appends refused (tests/gcs_fake.py). With
``--kill-after-step K`` the process ends as ``kill -9`` would (``os._exit``: no ``finally``, no
flush) right after the metrics of step K are written (printed as ``KILLED AFTER {json}``).
``--flush-interval S`` replaces ``storage.OBJECT_STORE_FLUSH_S`` (so that only the flushes the
loop must do happen, however slow the machine). Used by tests/test_object_store.py.
"""

import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gcs_fake  # noqa: E402


def main(argv: list[str]) -> None:
    split = argv.index("--")
    own, train_flags = argv[1:split], argv[split + 1 :]
    url, kill_after = own[0], None
    if "--kill-after-step" in own:
        kill_after = int(own[own.index("--kill-after-step") + 1])
    gcs_fake.install_no_append(url)
    if "--flush-interval" in own:
        from retinanet_jax import storage

        storage.OBJECT_STORE_FLUSH_S = float(own[own.index("--flush-interval") + 1])
    if kill_after is not None:
        from retinanet_jax.training import progress

        write = progress.MetricWriter.write

        def write_then_die(self, step, values):
            write(self, step, values)
            if step >= kill_after:
                print("KILLED AFTER", json.dumps({"step": step, **values}), flush=True)
                os._exit(137)

        progress.MetricWriter.write = write_then_die
    os.environ["RETINANET_JAX_HUGEPAGES"] = "0"  # no re-exec: it would drop the patches above
    train_py = os.path.join(os.path.dirname(HERE), "train.py")
    sys.argv = [train_py, *train_flags]
    runpy.run_path(train_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)

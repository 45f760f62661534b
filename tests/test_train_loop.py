"""train_and_evaluate end to end on the tiny config: outputs, resume, errors; train.py flags."""

import importlib.util
import json
import os
import runpy
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_utils import tiny_config

from retinanet_jax.data import TrainBatchIterator
from retinanet_jax.data.registry import SOURCES
from retinanet_jax.ops import anchors
from retinanet_jax.training import loop as train_loop
from retinanet_jax.training.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _cache(xla_compilation_cache):
    """The runs below compile the same train step again (interrupted + resumed runs)."""


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _restore_params(workdir):
    """Every array of the latest checkpoint's state, as numpy (no template needed)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    item = ckpt._manager.restore(
        ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    ckpt.close()
    return jax.tree.map(
        np.asarray,
        {
            "params": item["params"],
            "frozen": item["frozen_params"],
            "stats": item["batch_stats"],
            "opt": item["opt_state"],
        },
    )


def _without_timing(lines):
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in lines]


@pytest.mark.slow
def test_tiny_run_writes_metrics_checkpoints_and_detections(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    # Untrained after 4 steps, the scores sit below 0.05: keep every box so the JSON has some.
    cfg = tiny_config(
        num_steps=4,
        **{
            "checkpoint.every_steps": 2,
            "eval.every_steps": 100,
            "eval.score_thresh": 0.0,
            "mesh.num_devices": 2,
        },
    )
    result = train_loop.train_and_evaluate(cfg, workdir)

    lines = _lines(os.path.join(workdir, "metrics.jsonl"))
    train_lines = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]  # log_every_steps = 2
    assert all(np.isfinite(r["train/loss"]) and r["train/lr"] > 0 for r in train_lines)
    eval_lines = [r for r in lines if "eval/AP" in r]
    assert [r["step"] for r in eval_lines] == [4]  # at the end
    for key in ("eval/AP", "eval/AP50", "eval/AP75", "eval/APs", "eval/APm", "eval/APl"):
        assert key in eval_lines[0]
        np.testing.assert_allclose(result[key], eval_lines[0][key])

    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    meta = Checkpointer(os.path.join(workdir, "checkpoints")).read_meta()
    assert meta.extra["category_ids"] == [1, 2, 3, 4, 5]  # shapes has none: label + 1
    assert meta.extra["model"]["anchor_sizes"] == [list(s) for s in anchors.model_anchor_config(cfg.model)[0]]
    dets = json.load(open(os.path.join(workdir, "detections.json")))
    assert len(dets) == 8 * 20  # detections_per_img=20 for each of the 8 images
    assert {d["category_id"] for d in dets} <= {1, 2, 3, 4, 5}
    assert {d["image_id"] for d in dets} <= set(range(8))
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in dets)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 4
    assert "Final metrics at step 4" in capsys.readouterr().out

    # Rerunning the finished command trains and evaluates nothing more.
    again = train_loop.train_and_evaluate(cfg, workdir)
    assert _lines(os.path.join(workdir, "metrics.jsonl")) == lines
    np.testing.assert_allclose(again["eval/AP"], result["eval/AP"])


@pytest.mark.slow
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    # One device and 2 images per step keep the three compilations cheap.
    cfg = tiny_config(
        num_steps=4,
        batch_size=2,
        log_every_steps=1,
        **{"mesh.num_devices": 1, "checkpoint.every_steps": 2, "eval.enabled": False},
    )
    straight = str(tmp_path / "straight")
    train_loop.train_and_evaluate(cfg, straight)

    class Crashing(TrainBatchIterator):
        def __next__(self):
            if self.get_state()["position"] == 3:  # the 4th batch: after the checkpoint at 2
                raise RuntimeError("simulated crash")
            return super().__next__()

    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(train_loop, "TrainBatchIterator", Crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop.train_and_evaluate(cfg, interrupted)
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["2"]
    assert [r["step"] for r in _lines(os.path.join(interrupted, "metrics.jsonl"))] == [1, 2, 3]

    monkeypatch.setattr(train_loop, "TrainBatchIterator", TrainBatchIterator)
    train_loop.train_and_evaluate(cfg, interrupted)  # the same command again
    # The lost run's step 3 is replaced by the resumed one: one line per step.
    resumed_lines = _lines(os.path.join(interrupted, "metrics.jsonl"))
    assert [r["step"] for r in resumed_lines] == [1, 2, 3, 4]
    assert _without_timing(resumed_lines) == _without_timing(_lines(os.path.join(straight, "metrics.jsonl")))

    a, b = _restore_params(straight), _restore_params(interrupted)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise
    assert (
        Checkpointer(os.path.join(interrupted, "checkpoints")).read_meta().data_state
        == Checkpointer(os.path.join(straight, "checkpoints")).read_meta().data_state
    )


@pytest.mark.slow
def test_nonfinite_loss_names_the_step_and_keeps_checkpoints(tmp_path):
    # SGD with an absurd learning rate: step 1 is finite, its update blows the weights up.
    cfg = tiny_config(
        num_steps=4,
        batch_size=2,
        **{
            "mesh.num_devices": 1,
            "checkpoint.every_steps": 1,
            "eval.enabled": False,
            "optim.optimizer": "sgd",
            "optim.base_lr": 1e30,
            "optim.clip_grad_norm": None,
            "optim.warmup_steps": 0,
        },
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 2.*latest complete checkpoint \(step 1\)"
    ):
        train_loop.train_and_evaluate(cfg, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [1]
    params = _restore_params(workdir)["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bad_config_errors_name_the_key(tmp_path):
    """A bad config fails before anything is written: the workdir stays empty (no checkpoints
    folder, no config.json, no metrics), so fixing the config and rerunning starts clean."""
    bad = [
        (ValueError, "config.dataset.source", {"dataset.source": "nope"}),
        (ValueError, "config.model.num_classes=2 < 5", {"model.num_classes": 2}),
        (TypeError, "config.dataset.train", {"dataset.train": {"bogus": 1}}),
    ]
    for exc, match, overrides in bad:
        workdir = tmp_path / match.split("=")[0]
        workdir.mkdir()
        with pytest.raises(exc, match=match):
            train_loop.train_and_evaluate(tiny_config(**overrides), str(workdir))
        assert sorted(os.listdir(workdir)) == [], (match, os.listdir(workdir))


def test_train_py_parses_config_file_and_overrides(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []
    monkeypatch.setattr(train_loop, "train_and_evaluate", lambda c, w: calls.append((c, w)))
    argv = [
        "train.py",
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        f"--workdir={tmp_path}",
        "--config.batch_size=16",
        "--config.optim.base_lr=0.5",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
    cli.flags.FLAGS(argv)
    try:
        cli.main(argv[:1])
    finally:
        cli.flags.FLAGS.unparse_flags()
    ((config, workdir),) = calls
    assert workdir == str(tmp_path)
    assert config.batch_size == 16 and config.optim.base_lr == 0.5
    assert config.dataset.source == "shapes"


@pytest.mark.parametrize("name", ["custom_coco_json", "custom_voc_xml", "custom_csv"])
def test_scratch_config_string_is_the_from_scratch_recipe_for_each_format(name, monkeypatch):
    """``--config configs/<format>.py:scratch`` as train.py declares the flag (ml_collections
    ``DEFINE_config_file``): the recipe (no checkpoint, every layer trains, a schedule over
    num_steps), the format's own source, and overrides still apply; the plain file fine-tunes;
    the CLI's ``load_config`` reads FILE:ARG the same way; an unknown argument is refused."""
    from absl import flags
    from ml_collections import config_flags

    from retinanet_jax.cli.evaluate import load_config

    path = os.path.join(ROOT, "configs", f"{name}.py")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True)
    argv = ["train.py", f"--config={path}:scratch", "--config.num_steps=40"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
    fv(argv)
    c = fv.config
    fine_tune = runpy.run_path(path)["get_config"]()
    assert c.dataset.source == fine_tune.dataset.source != "tfds"
    assert (c.init.retinanet_checkpoint, c.init.backbone_checkpoint) == ("", "")
    assert fine_tune.init.retinanet_checkpoint  # the default still fine-tunes
    assert (c.model.frozen_bn, c.model.trainable_backbone_layers, c.optim.epochs) == (False, 5, None)
    assert c.num_steps == 40 and c.optim.schedule == "cosine"
    assert load_config(f"{path}:scratch", {"num_steps": 40}).to_dict() == c.to_dict()
    with pytest.raises(ValueError, match="'scrach'"):
        runpy.run_path(path)["get_config"]("scrach")


@pytest.mark.parametrize(
    "name",
    [
        "base",
        "shapes",
        "tiny",
        "coco_r50_fpn_v1",
        "coco_r50_fpn_v2",
        "custom_coco_json",
        "custom_voc_xml",
        "custom_csv",
    ],
)
def test_configs_load_and_name_known_settings(name):
    from retinanet_jax.training.optim import OptimConfig

    c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
    assert c.dataset.source in SOURCES
    OptimConfig.from_mapping(c.optim)  # every optimizer key is known
    if name == "coco_r50_fpn_v2":
        assert (c.model.variant, c.loss.box_loss, c.optim.optimizer, c.optim.base_lr) == (
            "v2",
            "giou",
            "adamw",
            1e-4,
        )


def test_metric_writer_drops_lines_past_the_resumed_step(tmp_path):
    from retinanet_jax.training.progress import MetricWriter

    w = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": float(step), "train/nan": float("nan")})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # torn last line of a killed process
    w = MetricWriter(tmp_path, start_step=2)
    w.write(3, {"train/loss": 30.0})
    w.close()
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 3, "train/loss": 30.0},
    ]
    assert not list(tmp_path.glob(".*tmp"))


def test_resume_refuses_a_config_that_reinterprets_the_stored_state(tmp_path, caplog):
    cfg = tiny_config(
        num_steps=1,
        batch_size=2,
        **{"mesh.num_devices": 1, "eval.enabled": False, "checkpoint.every_steps": 1},
    )
    workdir = str(tmp_path / "run")
    train_loop.train_and_evaluate(cfg, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))

    # Another batch size maps the stored data position to other images; another canvas set or
    # model to other batches / arrays: refused, naming every such key and both values.
    changed = tiny_config(
        num_steps=2,
        batch_size=4,
        **{"mesh.num_devices": 1, "eval.enabled": False, "checkpoint.every_steps": 1, "input.max_boxes": 7},
    )
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 4; input.max_boxes: \d+ -> 7") as err:
        train_loop.train_and_evaluate(changed, workdir)
    assert "checkpoints" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing written

    # Run length, logging and checkpoint cadence may change: resumed, and the changes are listed.
    longer = tiny_config(
        num_steps=2,
        batch_size=2,
        log_every_steps=1,
        **{"mesh.num_devices": 1, "eval.enabled": False, "checkpoint.every_steps": 1},
    )
    with caplog.at_level("WARNING"):
        train_loop.train_and_evaluate(longer, workdir)
    assert "['log_every_steps', 'num_steps']" in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]

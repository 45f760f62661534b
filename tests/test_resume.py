"""Which config changes a resumed run accepts (retinanet_jax.training.resume)."""

import copy

import pytest

from retinanet_jax.training.resume import check_resume, config_changes

SAVED = {
    "batch_size": 16,
    "seed": 0,
    "num_steps": None,
    "log_every_steps": 50,
    "dataset": {"source": "coco_json", "train": {"annotation_file": "a.json"}, "val": {"x": 1}},
    "input": {"min_sizes": [800], "max_size": 1333, "buckets": None},
    "model": {"backbone": "resnet50", "anchor_sizes": None},
    "optim": {"optimizer": "sgd", "base_lr": 0.01},
    "eval": {"every_steps": None},
}


def _with(**changes):
    out = copy.deepcopy(SAVED)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def test_tuples_and_lists_are_the_same_value():
    assert config_changes(SAVED, _with(input__min_sizes=(800,))) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("batch_size", 32),
        ("seed", 1),
        ("dataset__source", "voc_xml"),
        ("dataset__train__annotation_file", "b.json"),
        ("input__min_sizes", [640, 800]),
        ("input__max_size", 1024),
        ("input__buckets", [[800, 1344]]),
        ("model__backbone", "resnet18"),
        ("model__anchor_sizes", [[16], [32], [64], [128], [256]]),
        ("optim__optimizer", "adamw"),
    ],
)
def test_state_changing_keys_are_refused_by_name(key, value):
    flat = key.replace("__", ".")
    with pytest.raises(ValueError, match=rf"ckpt: .*{flat}: .* -> {value!r}".replace("[", r"\[")):
        check_resume(SAVED, _with(**{key: value}), "ckpt")


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_steps", 1000),
        ("log_every_steps", 10),
        ("eval__every_steps", 100),
        ("dataset__val__x", 2),
        ("optim__base_lr", 0.001),
    ],
)
def test_harmless_changes_are_allowed_and_listed(key, value):
    assert check_resume(SAVED, _with(**{key: value}), "ckpt") == [key.replace("__", ".")]


def test_a_checkpoint_without_a_config_resumes():
    assert check_resume(None, SAVED, "ckpt") == []


def test_a_checkpoint_from_before_fitted_canvases_reads_as_fixed():
    """Configs written before ``input.canvases`` existed ran the fixed canvases: resuming one
    with "fixed" (any max_canvases, which only "fit" reads) is allowed, "fit" is refused."""
    fixed = _with(input__canvases="fixed", input__max_canvases=8)
    assert check_resume(SAVED, fixed, "ckpt") == ["input.max_canvases"]
    with pytest.raises(ValueError, match=r"input.canvases: 'fixed' -> 'fit'"):
        check_resume(SAVED, _with(input__canvases="fit", input__max_canvases=8), "ckpt")
    with pytest.raises(ValueError, match=r"input.max_canvases: 8 -> 4"):
        fit = _with(input__canvases="fit", input__max_canvases=8)
        check_resume(fit, _with(input__canvases="fit", input__max_canvases=4), "ckpt")

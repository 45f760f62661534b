"""optim.py: schedules and update rules equal torchvision's recipes (torch as the oracle)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retinanet_jax.training import optim

torch = pytest.importorskip("torch")


def test_v1_schedule_values_at_chosen_steps():
    cfg = optim.TORCHVISION_V1
    spe = 2000  # warmup = min(1000, spe - 1) = 1000
    sched = optim.make_schedule(cfg, steps_per_epoch=spe, global_batch_size=16)
    lr = 0.01
    expect = {
        0: 0.001 * lr,
        500: lr * (0.001 + 0.999 * 0.5),
        1000: lr,
        16 * spe - 1: lr,
        16 * spe: 0.1 * lr,
        22 * spe - 1: 0.1 * lr,
        22 * spe: 0.01 * lr,
        26 * spe: 0.01 * lr,
    }
    got = {s: float(sched(s)) for s in expect}
    for s in expect:
        np.testing.assert_allclose(got[s], expect[s], rtol=1e-6, err_msg=f"step {s}")


def test_linear_lr_scaling_and_v2_no_scaling():
    s1 = optim.make_schedule(optim.TORCHVISION_V1, steps_per_epoch=10_000, global_batch_size=8)
    np.testing.assert_allclose(float(s1(5000)), 0.005, rtol=1e-6)  # 0.01 * 8 / 16
    s2 = optim.make_schedule(optim.TORCHVISION_V2, steps_per_epoch=10_000, global_batch_size=8)
    np.testing.assert_allclose(float(s2(5000)), 1e-4, rtol=1e-6)


def _torchvision_lrs(base_lr, steps_per_epoch, epochs, milestones, scheduler="multistep"):
    """lr per iteration as references/detection's train.py + engine.py produce it."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr, momentum=0.9)
    if scheduler == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for epoch in range(epochs):
        warm = None
        if epoch == 0:  # engine.train_one_epoch
            total = min(1000, steps_per_epoch - 1)
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / 1000, total_iters=total)
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if warm is not None:
                warm.step()
        main.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("kind", ["multistep", "cosine"])
def test_schedule_matches_torchvision_loop(kind):
    spe, epochs = 7, 6
    cfg = optim.OptimConfig(epochs=epochs, milestones=(2, 4), schedule=kind)
    ours = optim.make_schedule(cfg, steps_per_epoch=spe, global_batch_size=16)
    got = np.asarray(jax.vmap(ours)(jnp.arange(spe * epochs)))
    want = _torchvision_lrs(0.01, spe, epochs, (2, 4), kind)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


def _toy_params(rng):
    return {
        "conv": {
            "kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "bn": {
            "scale": rng.normal(size=(4,)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "head": {
            "gn": {
                "scale": rng.normal(size=(4,)).astype(np.float32),
                "bias": rng.normal(size=(4,)).astype(np.float32),
            }
        },
    }


def test_norm_param_mask_finds_norm_layers_only():
    mask = optim.norm_param_mask(_toy_params(np.random.default_rng(0)))
    assert mask == {
        "conv": {"kernel": False, "bias": False},
        "bn": {"scale": True, "bias": True},
        "head": {"gn": {"scale": True, "bias": True}},
    }


def _run_both(cfg, torch_opt_fn, steps=5, spe=3):
    """Runs our tx and a torch optimizer on identical params / grads; returns both."""
    rng = np.random.default_rng(1)
    params = _toy_params(rng)
    grads = [
        jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(steps)
    ]
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=spe, global_batch_size=16)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)

    flat = {"/".join(k): v for k, v in _flatten(params)}
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in flat.items()}
    topt, sched = torch_opt_fn(tp)
    for g in grads:
        for k, v in _flatten(g):
            tp["/".join(k)].grad = torch.tensor(v)
        topt.step()
        sched.step()
    want = {k: v.detach().numpy() for k, v in tp.items()}
    got = {"/".join(k): np.asarray(v) for k, v in _flatten(p)}
    return got, want


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _torch_warmup(opt, total):
    return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=total)


def test_sgd_equals_torch_sgd_coupled_weight_decay():
    cfg = optim.TORCHVISION_V1

    def make(tp):
        opt = torch.optim.SGD(list(tp.values()), lr=0.01, momentum=0.9, weight_decay=1e-4)
        return opt, _torch_warmup(opt, 2)  # min(1000, spe - 1) with spe = 3

    got, want = _run_both(cfg, make)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The decay matters at this size: without it the result differs.
    got_nowd, _ = _run_both(optim.OptimConfig(weight_decay=0.0), make)
    assert not np.allclose(got_nowd["conv/kernel"], want["conv/kernel"], rtol=1e-7, atol=0)


def test_adamw_equals_torch_adamw_with_norm_weight_decay_zero():
    # Large decay so that decaying the norm params would be visible.
    cfg = optim.OptimConfig(
        optimizer="adamw",
        base_lr=0.1,
        lr_scaling="none",
        weight_decay=0.5,
        norm_weight_decay=0.0,
        warmup_steps=0,
    )

    def make(tp):
        norm = [v for k, v in tp.items() if "/bn/" in f"/{k}" or "/gn/" in f"/{k}"]
        other = [v for k, v in tp.items() if not ("/bn/" in f"/{k}" or "/gn/" in f"/{k}")]
        opt = torch.optim.AdamW(
            [{"params": other, "weight_decay": 0.5}, {"params": norm, "weight_decay": 0.0}], lr=0.1
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    got, want = _run_both(cfg, make)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _adam_direction_vs_torch(scale_by_adam, b2, t, n=4096):
    """One Adam step at update count ``t`` from given moments, ours vs torch.optim.AdamW.

    torch's AdamW is loaded with the same state (``step = t - 1``, exp_avg, exp_avg_sq) at
    lr 1, no decay, param 0, so the param after its step is minus Adam's direction. Gradients
    and first moments share a sign and are bounded away from 0, so per-element relative errors
    measure the direction, not cancellation in ``m``. Returns relative errors [n]."""
    rng = np.random.default_rng(t)
    sign = rng.choice([-1.0, 1.0], size=n)
    g = (sign * rng.uniform(0.5, 2, n)).astype(np.float32)
    mu = (sign * rng.uniform(0.5, 2, n) * (1 - 0.9 ** (t - 1))).astype(np.float32)
    nu = (rng.uniform(0.5, 2, n) * (1 - b2 ** (t - 1))).astype(np.float32)
    state = optax.ScaleByAdamState(
        count=jnp.asarray(t - 1, jnp.int32), mu=jnp.asarray(mu), nu=jnp.asarray(nu)
    )
    got, _ = scale_by_adam(b1=0.9, b2=b2, eps=1e-8).update(jnp.asarray(g), state)
    p = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.AdamW([p], lr=1.0, betas=(0.9, b2), eps=1e-8, weight_decay=0.0)
    opt.state[p] = {
        "step": torch.tensor(float(t - 1)),
        "exp_avg": torch.tensor(mu),
        "exp_avg_sq": torch.tensor(nu),
    }
    p.grad = torch.tensor(g)
    opt.step()
    want = -p.detach().numpy()
    return (np.asarray(got, np.float64) - want) / want


@pytest.mark.parametrize(
    "b2, t",
    [
        (0.999, 1),
        (0.999, 2),
        (0.999, 10),
        (0.999, 100),
        (0.999, 1000),
        (0.99999, 1),
        (0.99999, 1000),
        (0.99999, 100000),
    ],
)
def test_scale_by_adam_torch_equals_torch_where_optax_cancels(b2, t):
    """Why ``scale_by_adam_torch`` exists: optax forms ``1 - b2**t`` in float32, where
    ``float32(0.999) = 0.999 + 1.29e-8`` makes ``1 - b2**t`` ~1.3e-5 too small for t <= ~100
    (relative; ``sqrt`` halves it: Adam's direction ~6.5e-6 too large), and with
    ``b2 = 0.99999`` (``float32(b2) = b2 - 1.36e-8``) ~1.4e-3 off (direction ~7e-4). torch
    evaluates it in double. Ours (``-expm1(t * log b2)``) equals torch to float32 rounding:
    m, v (2 roundings each, v's halved by the sqrt), /bc1, sqrt, /bc2, +eps, / : ~6 half-ulp
    roundings per side, 12 * 2**-24 = 7.2e-7 < 1e-6 relative. optax's error is systematic (one
    sign for every element), so its mean is far outside that band."""
    ours = _adam_direction_vs_torch(optim.scale_by_adam_torch, b2, t)
    assert np.max(np.abs(ours)) < 1e-6, np.max(np.abs(ours))
    assert abs(np.mean(ours)) < 5e-7, np.mean(ours)  # measured <= 2.1e-7 (torch's m is a lerp)
    theirs = _adam_direction_vs_torch(optax.scale_by_adam, b2, t)
    expect = {0.999: 3e-6, 0.99999: 3e-4}[b2]  # measured 3.7e-6 (t=1000) .. 1e-5; 4e-4 .. 7e-4
    assert abs(np.mean(theirs)) > expect, np.mean(theirs)


def test_adamw_with_b2_near_one_follows_torch_adamw_trajectory():
    """make_optimizer's AdamW over 30 steps with b2 = 0.99999, against torch.optim.AdamW: with
    optax's float32 bias correction every step's direction would be ~7e-4 too large (see above)
    and the params drift by ~1e-3 relative; ours stays at float32 rounding."""
    cfg = optim.OptimConfig(
        optimizer="adamw",
        base_lr=0.05,
        lr_scaling="none",
        weight_decay=0.5,
        norm_weight_decay=0.0,
        warmup_steps=0,
        adam_b2=0.99999,
    )

    def make(tp):
        norm = [v for k, v in tp.items() if "/bn/" in f"/{k}" or "/gn/" in f"/{k}"]
        other = [v for k, v in tp.items() if not ("/bn/" in f"/{k}" or "/gn/" in f"/{k}")]
        opt = torch.optim.AdamW(
            [{"params": other, "weight_decay": 0.5}, {"params": norm, "weight_decay": 0.0}],
            lr=0.05,
            betas=(0.9, 0.99999),
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    got, want = _run_both(cfg, make, steps=30)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_adamw_norm_params_get_no_decay_with_zero_grads():
    cfg = optim.TORCHVISION_V2
    params = _toy_params(np.random.default_rng(2))
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10, global_batch_size=16)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradient: Adam's part is 0, so only decay moves params -> norm params stay put.
    np.testing.assert_array_equal(np.asarray(upd["bn"]["scale"]), 0.0)
    np.testing.assert_array_equal(np.asarray(upd["head"]["gn"]["bias"]), 0.0)
    lr0 = 1e-4 * 1e-3  # warmup start
    np.testing.assert_allclose(
        np.asarray(upd["conv"]["kernel"]), -lr0 * 0.05 * params["conv"]["kernel"], rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(upd["conv"]["bias"]), -lr0 * 0.05 * params["conv"]["bias"], rtol=1e-5
    )


def test_clip_grad_norm_clips_global_norm():
    cfg = optim.OptimConfig(momentum=0.0, weight_decay=0.0, warmup_steps=0, clip_grad_norm=1.0)
    tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, global_batch_size=16)
    params = {"w": jnp.zeros((3,))}
    g = {"w": jnp.asarray([30.0, 40.0, 0.0])}  # norm 50
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.01 * np.array([0.6, 0.8, 0.0]), rtol=1e-6)


def test_from_mapping_rejects_unknown_keys():
    cfg = optim.OptimConfig.from_mapping({"optimizer": "adamw", "milestones": [8, 11]})
    assert cfg.milestones == (8, 11) and cfg.optimizer == "adamw"
    with pytest.raises(ValueError, match="unknown optimizer settings"):
        optim.OptimConfig.from_mapping({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="optimizer must be"):
        optim.make_optimizer(optim.OptimConfig(optimizer="lamb"), 10, 16)
    assert math.isclose(optim.scaled_lr(optim.TORCHVISION_V1, 32), 0.02)


def test_per_step_cosine_follows_fractional_epochs():
    cfg = optim.OptimConfig(
        optimizer="adamw",
        base_lr=1e-3,
        lr_scaling="none",
        schedule="cosine",
        epochs=2,
        warmup_steps=0,
        schedule_unit="step",
    )
    sched = optim.make_schedule(cfg, steps_per_epoch=100, global_batch_size=8)
    for step in (0, 37, 100, 150, 200, 250):
        want = 1e-3 * 0.5 * (1 + np.cos(np.pi * min(step / 100, 2) / 2))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, atol=1e-12)
    per_epoch = optim.make_schedule(dataclasses.replace(cfg, schedule_unit="epoch"), 100, 8)
    assert float(per_epoch(150)) == float(per_epoch(100)) != float(sched(150))
    with pytest.raises(ValueError, match="schedule_unit"):
        optim.make_schedule(dataclasses.replace(cfg, schedule_unit="batch"), 100, 8)


def test_schedule_over_the_run_steps_ignores_epochs():
    """optim.epochs=None: cosine over run_steps updates and a warmup of warmup_steps, however
    many steps an epoch has (a fixed-length run on a dataset of any size)."""
    cfg = optim.OptimConfig(
        optimizer="adamw",
        base_lr=1e-3,
        lr_scaling="none",
        schedule="cosine",
        epochs=None,
        milestones=(),
        warmup_steps=50,
        warmup_factor=0.1,
    )
    for steps_per_epoch in (7, 25, 1000):  # warmup 50 > an epoch of 7 or 25: not capped
        sched = optim.make_schedule(cfg, steps_per_epoch, 8, run_steps=400)
        for step in (0, 10, 50, 123, 400, 500):
            warm = 0.1 + 0.9 * min(step, 50) / 50
            want = 1e-3 * warm * 0.5 * (1 + np.cos(np.pi * min(step, 400) / 400))
            np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="needs the run's length"):
        optim.make_schedule(cfg, 25, 8)
    with pytest.raises(ValueError, match=r"milestones=\(3,\) are epochs"):
        optim.make_schedule(dataclasses.replace(cfg, schedule="multistep", milestones=(3,)), 25, 8, 400)

"""Canvases fitted to the data (imageprep.canvases): canvas share on COCO-like sizes, fit,
bounds, determinism, small groups; the pipeline and the evaluation plan use them."""

import collections
import itertools
import math

import numpy as np
import pytest
from detection_utils import SizedSource

from retinanet_jax.data.canvas_stats import source_canvas_usage
from retinanet_jax.data.pipeline import TrainBatchIterator
from retinanet_jax.imageprep import canvases, geometry

MIN_SIZE, MAX_SIZE = 800, 1333  # COCO v1 recipe (configs/base.py)
GLOBAL_BATCH = 16  # configs/base.py batch_size

# COCO-like image sizes (w, h) -> share of images. APPROXIMATE, written from what is published
# about COCO 2017 train (118,287 Flickr images, cocodataset.org): images were downscaled to
# 640 px on the long side, so almost every image is 640 wide (landscape) or 640 high
# (portrait), mostly 4:3 (640x480) and 3:2 (640x427 and its rounding neighbours 426 / 428 /
# 424 / 425 / 429); squares (612x612, Instagram's former size; 640x640), 500x375 and 16:9
# (640x360) are the frequent others; ~3/4 are landscape; 90% have h/w between 0.6 and 1.5
# (COCO 2014 train statistics). The shares below are our rounded reading of those frequencies,
# not counts; the rest (~8.5%) is a long tail of 640-px-long-side images with log-uniform
# aspect ratios in [1/2, 2]. Only the shape of the distribution matters for the test.
COCO_LIKE = {
    (640, 480): 0.32,
    (640, 427): 0.21,
    (480, 640): 0.09,
    (640, 426): 0.05,
    (427, 640): 0.05,
    (640, 428): 0.04,
    (640, 360): 0.03,
    (612, 612): 0.02,
    (500, 375): 0.02,
    (640, 424): 0.02,
    (640, 425): 0.015,
    (640, 429): 0.01,
    (425, 640): 0.01,
    (426, 640): 0.01,
    (640, 512): 0.01,
    (640, 640): 0.01,
}


def coco_like_sizes(n=4000, seed=0):
    """n (h, w) sizes drawn as COCO_LIKE describes (deterministic)."""
    sizes = [(h, w) for (w, h), p in COCO_LIKE.items() for _ in range(round(p * n))]
    ratios = np.exp(np.random.default_rng(seed).uniform(np.log(0.5), np.log(2.0), n - len(sizes)))
    sizes += [(round(640 / r), 640) if r >= 1 else (640, round(640 * r)) for r in ratios]  # r = w / h
    return sizes


def random_sizes(seed, n):
    """Sizes of every aspect ratio, small and large images (some beyond max_size)."""
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(16, 3000, (n, 2))]


def _fits(sizes, chosen, min_size, max_size):
    """Each known image's resized size fits the canvas it goes on (that canvas being chosen)."""
    for s in sizes:
        h, w = geometry.resized_size(s, min_size, max_size)
        c = geometry.image_bucket(s, chosen, min_size, max_size)
        assert c in chosen and h <= c[0] and w <= c[1], (s, c)


def test_coco_like_canvas_share_fitted_vs_fixed_vs_unknown_size():
    sizes = coco_like_sizes()
    assert len(sizes) == 4000
    fitted = canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=8, min_group=GLOBAL_BATCH)
    fit = canvases.canvas_usage(sizes, fitted, MIN_SIZE, MAX_SIZE)
    fixed = canvases.canvas_usage(sizes, geometry.make_buckets(MIN_SIZE, MAX_SIZE), MIN_SIZE, MAX_SIZE)
    square = canvases.canvas_usage(sizes, [geometry.unknown_size_canvas(MAX_SIZE)], MIN_SIZE, MAX_SIZE)
    print(f"\nunknown-size (L, L): {square.describe()}\nfixed: {fixed.describe()}\nfit: {fit.describe()}")
    assert len(fitted) <= 8 and fit.share >= 0.85
    assert 0.45 <= square.share <= 0.52  # (1344, 1344) for everything: about half is padding
    assert fixed.share < fit.share
    # A 640x480 image (800 x 1066 resized) on its canvas: 800 x 1088, not 800 x 1344.
    assert geometry.image_bucket((480, 640), fitted, MIN_SIZE, MAX_SIZE) == (800, 1088)
    assert sum(fit.counts.values()) == len(sizes) and min(fit.counts.values()) >= GLOBAL_BATCH
    _fits(sizes, fitted, MIN_SIZE, MAX_SIZE)


@pytest.mark.parametrize("seed", range(6))
def test_every_image_fits_bounded_deterministic_and_groups_hold_a_batch(seed):
    sizes = random_sizes(seed, 300)
    k, batch = 1 + seed, (1, 4, 16, 64, 5, 2)[seed]
    chosen = canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=k, min_group=batch)
    assert 1 <= len(chosen) <= k
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in chosen)
    _fits(sizes, chosen, MIN_SIZE, MAX_SIZE)
    # A pure function of the sizes (whatever their order): every host gets the same canvases.
    shuffled = [sizes[i] for i in np.random.default_rng(99).permutation(len(sizes))]
    again = canvases.fit_canvases(shuffled, MIN_SIZE, MAX_SIZE, max_canvases=k, min_group=batch)
    assert again == chosen
    counts = canvases.canvas_usage(sizes, chosen, MIN_SIZE, MAX_SIZE).counts
    assert min(counts.values()) >= batch and sum(counts.values()) == len(sizes)
    # More canvases never cost more canvas area.
    more = canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=k + 1, min_group=batch)
    usage = canvases.canvas_usage(sizes, more, MIN_SIZE, MAX_SIZE)
    assert usage.share >= canvases.canvas_usage(sizes, chosen, MIN_SIZE, MAX_SIZE).share - 1e-12


def _best_split_area(sizes, max_canvases, min_group, min_size, max_size):
    """Brute force: the least total canvas area over every cut of the aspect-ordered distinct
    padded sizes into <= max_canvases runs of >= min_group images each."""
    counts = collections.Counter(
        geometry.padded_size(geometry.resized_size(s, min_size, max_size)) for s in sizes
    )
    order = sorted(counts, key=lambda hw: (hw[0] / hw[1], hw))
    best = math.inf
    for groups in range(1, min(max_canvases, len(order)) + 1):
        for cuts in itertools.combinations(range(1, len(order)), groups - 1):
            bounds, total = (0, *cuts, len(order)), 0
            for a, b in zip(bounds, bounds[1:]):
                n = sum(counts[hw] for hw in order[a:b])
                total += (
                    math.inf
                    if n < min_group
                    else n * max(h for h, _ in order[a:b]) * max(w for _, w in order[a:b])
                )
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_fit_is_the_least_area_of_all_aspect_ordered_splits(seed):
    rng = np.random.default_rng(seed)
    pool = random_sizes(100 + seed, 8)
    sizes = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(10, 60)))]
    k, batch = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    chosen = canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=k, min_group=batch)
    usage = canvases.canvas_usage(sizes, chosen, MIN_SIZE, MAX_SIZE)
    area = sum(h * w * n for (h, w), n in usage.counts.items())
    # On its canvases at run time (the smallest that holds each) no worse than the best split.
    assert area <= _best_split_area(sizes, k, batch, MIN_SIZE, MAX_SIZE)
    assert len(chosen) <= k and min(usage.counts.values()) >= min(batch, len(sizes))


def test_groups_that_the_smallest_fitting_canvas_leaves_too_small_are_merged():
    """The aspect-ratio groups hold 4+ images each, but at run time an image goes on the
    smallest canvas that holds it: the three 64x96 images leave the portrait image's group
    (128 x 96) for the 64 x 128 canvas, so it would hold 1 image, never a whole batch."""
    sizes = [
        (55, 243),
        (159, 185),
        (188, 219),
        (28, 155),
        (61, 132),
        (279, 173),
        (39, 171),
        (56, 231),
        (285, 294),
    ]
    chosen = canvases.fit_canvases(sizes, 64, 128, max_canvases=4, min_group=4)
    counts = canvases.canvas_usage(sizes, chosen, 64, 128).counts
    assert min(counts.values()) >= 4 and sum(counts.values()) == 9
    _fits(sizes, chosen, 64, 128)


def test_fewer_images_than_a_batch_one_canvas_and_a_lone_odd_image_joins_a_group():
    assert canvases.fit_canvases([(480, 640)] * 3, MIN_SIZE, MAX_SIZE, min_group=16) == [(800, 1088)]
    sizes = [(480, 640)] * 20 + [(640, 480)]  # one portrait image among landscape ones
    chosen = canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, min_group=16)
    assert chosen == [(1088, 1088)]
    assert canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, min_group=1) == [(800, 1088), (1088, 800)]
    assert canvases.fit_canvases([None, None], MIN_SIZE, MAX_SIZE) == []
    with pytest.raises(ValueError, match="max_canvases >= 1"):
        canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=0)


def test_select_canvases_modes_and_unknown_sizes():
    sizes = coco_like_sizes(400)
    big = geometry.unknown_size_canvas(MAX_SIZE)
    fit = canvases.select_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=8)
    assert fit == canvases.fit_canvases(sizes, MIN_SIZE, MAX_SIZE, max_canvases=8) and big not in fit
    # Some sizes unknown: the (L, L) canvas that holds any image is one of the 8.
    partly = canvases.select_canvases(sizes + [None], MIN_SIZE, MAX_SIZE, max_canvases=8)
    assert big in partly and len(partly) <= 8
    _fits(sizes, partly, MIN_SIZE, MAX_SIZE)
    assert canvases.select_canvases([None] * 5, MIN_SIZE, MAX_SIZE) == [big]
    usage = canvases.canvas_usage(sizes + [None], partly, MIN_SIZE, MAX_SIZE)
    assert usage.unknown == 1 and usage.counts[big] >= 1
    fixed = canvases.select_canvases(sizes, MIN_SIZE, MAX_SIZE, mode="fixed")
    assert fixed == geometry.make_buckets(MIN_SIZE, MAX_SIZE)
    given = canvases.select_canvases(sizes, MIN_SIZE, MAX_SIZE, buckets=[(1344, 1344)])
    assert given == [(1344, 1344)]
    with pytest.raises(ValueError, match="canvas mode must be one of"):
        canvases.select_canvases(sizes, MIN_SIZE, MAX_SIZE, mode="auto")


def test_pipeline_fits_canvases_by_default_and_every_canvas_trains():
    # 24 landscape 4:3, 18 portrait 3:2, 3 square images, small originals; v1-like resize at 1/10.
    sizes = [(48, 64)] * 24 + [(64, 43)] * 18 + [(50, 50)] * 3
    kw = dict(batch_size=4, process_count=2, min_sizes=(80,), max_size=133, seed=0)
    it = TrainBatchIterator(SizedSource(sizes), **kw)
    # 3 squares < a global batch of 8: they join a neighbour instead of never training.
    assert it.canvases == [(96, 128), (128, 96)]
    counts = it.canvas_usage.counts
    assert min(counts.values()) >= 8 and sum(counts.values()) == len(sizes)
    assert it.steps_per_epoch == sum(n // 8 for n in counts.values()) == 5
    assert next(it)["images"].shape[1:3] in [(96, 128), (128, 96)]
    fixed = TrainBatchIterator(SizedSource(sizes), **kw, canvases="fixed")
    assert fixed.canvases == [(96, 96), (96, 160), (160, 96)]  # make_buckets(80, 133)
    assert source_canvas_usage(SizedSource(sizes), fixed.canvases, 80, 133).share < it.canvas_usage.share


def test_eval_plan_fits_canvases_to_the_validation_sizes():
    from retinanet_jax.evaluation.loop import eval_plan

    sizes = coco_like_sizes(500)
    plan = eval_plan(SizedSource(sizes), 8, min_size=MIN_SIZE, max_size=MAX_SIZE)
    used = sorted({c for c, _ in plan})
    assert len(used) <= 8 and geometry.unknown_size_canvas(MAX_SIZE) not in used
    assert (800, 1088) in used  # 640x480 images, not on 800 x 1344
    seen = np.concatenate([row for _, row in plan])
    assert sorted(seen[seen >= 0].tolist()) == list(range(len(sizes)))
    for canvas, row in plan:
        for i in row[row >= 0]:
            h, w = geometry.resized_size(sizes[i], MIN_SIZE, MAX_SIZE)
            assert h <= canvas[0] and w <= canvas[1]
    fixed = eval_plan(SizedSource(sizes), 8, min_size=MIN_SIZE, max_size=MAX_SIZE, canvases="fixed")
    assert sorted({c for c, _ in fixed}) == geometry.make_buckets(MIN_SIZE, MAX_SIZE)

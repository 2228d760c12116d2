"""The cached teacher (issue 23 item 3): every photo labelled once per scale level by annotate's
Predictor, kept in OUT/teacher, resumable; crops take the labels of the level nearest their scale,
and the least sure pixels are ranked by the margin of the two best classes (probabilities round to
1 where a CLIP teacher is sure)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, write_images
from seglabel.distill.cache import TeacherCache, nearest_level, scale_levels
from seglabel.distill.data import Pair
from seglabel.distill.dataset import Augment, PairDataset
from seglabel.distill.teacher import Teacher
from seglabel.images import load_image
from seglabel.labelset import LabelSet
from seglabel.predict import Predictor, Protocol

LABELS = LabelSet.from_names(["sky", "grass", "road"])


@pytest.fixture(scope="module")
def teacher(tiny_weights):
    from seglabel.models.registry import load_segmenter

    model = load_segmenter("maskclip:tiny-vit", LABELS, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]))
    return Teacher(model.eval(), Protocol(short_side=32), LABELS, None)


def test_scale_levels_are_about_sqrt2_apart_and_crops_take_the_nearest():
    assert scale_levels(0.5, 2.0) == [0.5, 0.707, 1.0, 1.414, 2.0]
    assert scale_levels(1.0, 1.0) == [1.0] and scale_levels(1.0, 2.0) == [1.0, 1.414, 2.0]
    levels = scale_levels(0.5, 2.0)
    assert [nearest_level(f, levels) for f in (0.5, 0.59, 0.6, 0.99, 1.15, 1.2, 1.95)] == [0, 0, 1, 2, 2, 3, 4]


def test_predictor_margins_are_the_gap_between_the_two_best_logits(teacher):
    rgb = load_image(write_images_once())
    plain = Predictor(teacher.model, Protocol(short_side=32)).predict([rgb])[0]
    both = Predictor(teacher.model, Protocol(short_side=32), margins=True).predict([rgb])[0]
    assert plain.margin is None and np.array_equal(both.labels, plain.labels)
    np.testing.assert_allclose(both.confidence, plain.confidence)
    # the margin orders pixels as the confidence does where the confidence has not saturated ...
    p = np.clip(both.confidence.astype(np.float64), 0, 1 - 1e-7)
    assert both.margin.min() >= 0 and np.corrcoef(both.margin.ravel(), np.log(p / (1 - p)).ravel())[0, 1] > 0.8


_PHOTO = {}


def write_images_once():
    if "path" not in _PHOTO:
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix="seglabel-cache-test-"))
        _PHOTO["path"] = write_images(folder, ["a.png"], size=(40, 56))[0]
    return _PHOTO["path"]


def test_cache_labels_every_photo_at_every_level_once(tmp_path, teacher):
    paths = write_images(tmp_path / "photos", ["a.png", "x/b.png"], size=(40, 56))
    items = [("a", paths[0]), ("x/b", paths[1])]
    cache = TeacherCache(tmp_path / "run", [0.5, 1.0, 2.0], base_size=32)
    assert cache.build(teacher, items, {"teacher": "tiny"}) == 6
    for level, side in enumerate((16, 32, 64)):
        ids, conf, margin = cache.read(level, "x/b", 255)
        assert ids.shape == conf.shape == margin.shape == (side, round(56 * side / 40))  # the resized photo's size
        assert ids.max() < 3 and (conf > 0).all() and (margin >= 0).all()
    expected = Predictor(teacher.model, Protocol(short_side=32)).predict_prepared(
        [Predictor(teacher.model, Protocol(short_side=32)).prepare(load_image(paths[0]))], [(32, 45)])[0]
    np.testing.assert_array_equal(cache.read(1, "a", 255)[0], expected.labels)  # annotate's labels at that size
    assert cache.build(teacher, items, {"teacher": "tiny"}) == 0  # resumable: nothing left to do
    (cache.paths(2, "a")[2]).unlink()  # a kill before the mask was written
    assert cache.build(teacher, items, {"teacher": "tiny"}) == 1
    assert cache.build(teacher, items, {"teacher": "another"}) == 6  # another teacher: all over again


def test_crops_take_the_cached_labels_of_their_scale(tmp_path, teacher):
    paths = write_images(tmp_path / "photos", ["a.png"], size=(40, 56))
    cache = TeacherCache(tmp_path / "run", [0.5, 1.0, 2.0], base_size=32)
    cache.build(teacher, [("a", paths[0])], {"teacher": "tiny"})
    for factor, level in ((0.5, 0), (2.0, 2)):
        aug = Augment(crop=128, base_size=32, scale_range=(factor, factor), flip=False, photometric=False)
        data = PairDataset([Pair("a", paths[0], None)], aug, (0, 0, 0), (1, 1, 1), 255, cache=cache)
        _, target, sure, _ = data[0]
        ids, _, margin = cache.read(level, "a", 255)
        h, w = ids.shape
        assert torch.equal(target[:h, :w], torch.from_numpy(ids)) and (target[h:] == 255).all()
        torch.testing.assert_close(sure[:h, :w], torch.from_numpy(margin))

"""The sticker example's procedural data: deterministic, varied, the promised classes and splits."""

import numpy as np
import pytest

from examples.sticker_classifier.data import BASE_STICKERS, CLASSES, NEW_STICKERS, make_dataset


def test_classes_and_splits():
    assert len(CLASSES) >= 24 and len(set(CLASSES)) == len(CLASSES)
    for name in ("heart", "star", "smiley", "arrow", "lightning", "sun", "house"):
        assert name in CLASSES
    assert len(NEW_STICKERS) >= 5
    assert not set(NEW_STICKERS) & set(BASE_STICKERS)
    assert set(NEW_STICKERS) | set(BASE_STICKERS) == set(CLASSES)


def test_shape_dtype_range_and_labels():
    x, y = make_dataset(CLASSES, 3, seed=0)
    assert x.shape == (3 * len(CLASSES), 28, 28) and x.dtype == np.uint8
    assert y == CLASSES * 3
    # white strokes on black: every drawing has ink, most of the canvas is background
    ink = (x > 127).mean(axis=(1, 2))
    assert x.max() == 255 and (x.reshape(len(x), -1).max(1) > 200).all()
    assert (ink > 0.02).all() and (ink < 0.5).all()
    assert (x[:, 0, :].mean() < 10) and (x[:, :, 0].mean() < 10)  # margins stay mostly black


def test_deterministic_for_a_seed_and_independent_of_other_classes():
    a, la = make_dataset(["star", "moon"], 4, seed=7)
    b, lb = make_dataset(["star", "moon"], 4, seed=7)
    assert la == lb and np.array_equal(a, b)
    c, _ = make_dataset(["moon"], 4, seed=7)
    assert np.array_equal(c, a[1::2])


def test_seeds_and_samples_differ():
    a, _ = make_dataset(CLASSES, 2, seed=0)
    b, _ = make_dataset(CLASSES, 2, seed=1)
    diff = np.abs(a.astype(int) - b.astype(int)).mean(axis=(1, 2))
    assert (diff > 1).all()  # every single drawing changed with the seed
    n = len(CLASSES)
    within = np.abs(a[:n].astype(int) - a[n:].astype(int)).mean(axis=(1, 2))
    assert (within > 1).all()  # two drawings of a class are never copies


def test_classes_are_separable_by_nearest_centroid():
    """A weak oracle that the classes look different: nearest class mean beats chance by far."""
    x, y = make_dataset(CLASSES, 12, seed=3)
    xt, yt = make_dataset(CLASSES, 4, seed=4)
    f = x.reshape(len(x), -1).astype(np.float32) / 255
    ft = xt.reshape(len(xt), -1).astype(np.float32) / 255
    labels = np.array(y)
    cent = np.stack([f[labels == c].mean(0) for c in CLASSES])
    pred = np.array(CLASSES)[((ft[:, None] - cent[None]) ** 2).sum(-1).argmin(1)]
    assert (pred == np.array(yt)).mean() > 0.3  # chance is 1/36


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown sticker"):
        make_dataset(["unicorn"], 1, seed=0)


def test_extend_classifier_keeps_old_logits_and_adds_zero_rows():
    import torch

    from examples.sticker_classifier.model import StickerNet, embed, extend_classifier, to_tensor

    torch.manual_seed(0)
    m = StickerNet(4)
    x, _ = make_dataset(CLASSES[:2], 2, seed=0)
    with torch.no_grad():
        before = m(to_tensor(x))
        extend_classifier(m, 3)
        after = m(to_tensor(x))
    assert after.shape == (4, 7)
    assert torch.equal(after[:, :4], before) and not after[:, 4:].any()
    # the embedding the kNN pipeline uses is the head's input
    torch.testing.assert_close(m.classifier(torch.from_numpy(embed(m, x))), after)

"""Resizing, upsampling and refinements of the prediction path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglabel.labelset import parse_labelset
from seglabel.predict import Prediction, Predictor, Protocol, bilinear_matrix, resized_size, to_mask
from seglabel.refine import key_smoothing, prompt_denoising
from seglabel.text import class_max, encode_prompts


@pytest.mark.parametrize("n_in, n_out", [(4, 32), (7, 50), (50, 7), (13, 13), (1, 5)])
def test_bilinear_matrix_equals_interpolate(n_in, n_out):
    x = torch.randn(1, 3, n_in, 5)
    m = bilinear_matrix(n_in, n_out)
    expected = F.interpolate(x, size=(n_out, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.einsum("oi,bciw->bcow", m, x), expected, atol=1e-5, rtol=1e-5)


def test_resized_size_follows_short_side_and_long_cap():
    assert resized_size(480, 640, Protocol(short_side=512)) == (512, 683)
    assert resized_size(100, 1000, Protocol(short_side=512, max_long_side=2048)) == (205, 2048)
    assert resized_size(100, 1000, Protocol(short_side=512, max_long_side=0)) == (512, 5120)


class ConstantGrid(torch.nn.Module):
    """A fake segmenter returning fixed logits on its grid, to check the pixel mapping."""

    mean, std, stride = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 8

    def __init__(self, logits_fn):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits_fn = logits_fn

    pad_to = property(lambda self: self.stride)
    device = property(lambda self: self.w.device)

    def forward(self, x):
        return self.logits_fn(x)


def test_finish_matches_two_step_interpolation_with_padding_crop():
    torch.manual_seed(0)
    grid = torch.randn(1, 4, 5, 7)  # covers a padded 40x56 input
    predictor = Predictor(ConstantGrid(lambda x: grid.expand(x.shape[0], -1, -1, -1)),
                          Protocol(short_side=37, max_long_side=0))
    rgb = np.zeros((74, 100, 3), dtype=np.uint8)  # resized to 37x50, padded to 40x56
    [pred] = predictor.predict([rgb])
    up = F.interpolate(grid, size=(40, 56), mode="bilinear", align_corners=False)[:, :, :37, :50]
    up = F.interpolate(up, size=(74, 100), mode="bilinear", align_corners=False)
    probs = up.softmax(dim=1)[0]
    np.testing.assert_array_equal(pred.labels, probs.argmax(0).numpy())
    np.testing.assert_allclose(pred.confidence, probs.max(0).values.numpy(), atol=1e-5)


def test_sliding_window_covers_every_pixel_and_matches_whole_image_for_a_pointwise_model():
    # A model whose logits depend only on the pixel itself gives the same labels either way.
    def pointwise(x):
        return torch.stack([x[:, 0] - 0.5, 0.5 - x[:, 0]], dim=1)[:, :, ::8, ::8] * 10

    rgb = np.zeros((64, 160, 3), dtype=np.uint8)
    rgb[:, 80:] = 255
    whole = Predictor(ConstantGrid(pointwise), Protocol(short_side=64)).predict([rgb])[0]
    slid = Predictor(ConstantGrid(pointwise), Protocol(short_side=64, window=32, window_stride=24),
                     batch_size=3).predict([rgb])[0]
    assert (whole.labels[:, :70] == 1).all() and (whole.labels[:, 90:] == 0).all()
    assert (slid.labels[:, :70] == 1).all() and (slid.labels[:, 90:] == 0).all()


def test_to_mask_applies_ignore_classes_and_confidence():
    ls = parse_labelset({"classes": ["a", "b"], "catch_all": "other", "ignore": {"classes": ["other"]}})
    pred = Prediction(np.array([[0, 1, 2]]), np.array([[0.9, 0.2, 0.9]], dtype=np.float32))
    np.testing.assert_array_equal(to_mask(pred, ls), [[0, 1, 255]])
    np.testing.assert_array_equal(to_mask(pred, ls, min_confidence=0.5), [[0, 255, 255]])


def test_class_max_pools_prompts_of_a_class():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.2]]).view(1, 4, 1, 1)
    pooled = class_max(scores, [0, 1, 1, 2], 3)
    assert pooled.view(-1).tolist() == pytest.approx([0.1, 0.5, 0.2])


def test_encode_prompts_averages_normalised_template_embeddings():
    table = {"a x": [1.0, 0.0], "b x": [0.0, 2.0], "a y": [3.0, 3.0], "b y": [0.0, -1.0]}
    texts: list[str] = []

    def tokenize(batch):
        texts.extend(batch)
        return torch.arange(len(texts) - len(batch), len(texts))

    def encode(idx):
        return torch.tensor([table[texts[i]] for i in idx])

    emb = encode_prompts(encode, tokenize, ["x", "y"], ["a {}", "b {}"])
    s = 2 ** -0.5
    expected = F.normalize(torch.tensor([[0.5, 0.5], [(s + 0) / 2, (s - 1) / 2]]), dim=-1)
    torch.testing.assert_close(emb, expected)


def test_prompt_denoising_removes_classes_confident_nowhere():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 10  # class 0 wins everywhere
    logits[0, 1, 0, 0] = 10.5  # class 1 wins one position, with probability ~0.62
    logits[0, 2] = 9  # class 2 never reaches 0.5
    out = prompt_denoising(logits, 0.5)
    assert (out[0, 2] < -1000).all()
    torch.testing.assert_close(out[0, :2], logits[0, :2])


def test_key_smoothing_is_one_pass_of_cosine_weights():
    probs = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])  # (1, 2, 1, 2)
    keys = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # key vectors (1,0) and (1,1)
    out = key_smoothing(probs, keys, threshold=1.0)
    c = 2 ** -0.5
    w = torch.tensor([[1.0, c], [c, 1.0]])
    expected = (w @ probs.view(2, 2).T).T.view(1, 2, 1, 2)
    torch.testing.assert_close(out, expected)
    kept = key_smoothing(probs, keys, threshold=0.85)  # position 0 is confident: kept as it is
    torch.testing.assert_close(kept[..., 0], probs[..., 0])
    torch.testing.assert_close(kept[..., 1], expected[..., 1])

"""The protocol of a run is decided once (issue 25, item 2): options as given (None: not given) ->
``predict.resolve_protocol`` (given > --protocol paper or the model's own > defaults) -> a
concrete ``Protocol`` that ``Predictor`` and ``annotate()`` use as it is. And the settings of a
run have one schema, whether known before the model is built or after."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import TINY_CONFIGS
from seglabel.annotate import AnnotateConfig
from seglabel.predict import Predictor, Protocol, ProtocolOptions, resolve_protocol
from seglabel.recipe import make_recipe


class Model(torch.nn.Module):
    """A segmenter stand-in for the rules: what ``resolve_protocol`` and ``Predictor`` read."""

    stride, mean, std, device = 8, (0.5,) * 3, (0.5,) * 3, torch.device("cpu")
    pad_to = 8

    def __init__(self, own=None, method="maskclip"):
        super().__init__()
        self.default_protocol, self.method = own, method


STUDENT = {"short_side": 320}  # a student's training scale
LSEG = {"tta": True, "scales": (1.0,), "flip": False}  # an own evaluation protocol
SCLIP_PAPER = dict(short_side=336, max_long_side=2048, window=224, window_stride=112)


@pytest.mark.parametrize("own, method, options, expected", [
    (None, "sclip", {}, Protocol()),  # nothing given: seglabel's defaults
    (None, "sclip", {"short_side": 512}, Protocol()),
    (None, "sclip", {"paper": True}, Protocol(**SCLIP_PAPER)),
    (None, "sclip", {"paper": True, "short_side": 448}, Protocol(**{**SCLIP_PAPER, "short_side": 448})),
    # a window given without a stride: half the given window, not the paper's stride
    (None, "sclip", {"paper": True, "window": 320}, Protocol(**{**SCLIP_PAPER, "window": 320, "window_stride": 0})),
    (None, "sclip", {"window": 64, "window_stride": 16}, Protocol(window=64, window_stride=16)),
    (STUDENT, "maskclip", {}, Protocol(short_side=320)),  # the model's own
    (STUDENT, "maskclip", {"max_long_side": 0}, Protocol(short_side=320, max_long_side=0)),
    (STUDENT, "maskclip", {"short_side": 512}, Protocol()),  # 512 given is given, not the default
    (STUDENT, "maskclip", {"paper": True}, Protocol(short_side=320)),  # its own protocol is its paper's
    (LSEG, "maskclip", {}, Protocol(**LSEG)),
    (LSEG, "maskclip", {"pamr": True}, Protocol(pamr=True)),
    (LSEG, "maskclip", {"window": 64}, Protocol(window=64)),
    (LSEG, "maskclip", {"max_long_side": 1000}, Protocol(max_long_side=1000, **LSEG)),
])
def test_given_wins_then_paper_or_the_models_own_then_the_defaults(own, method, options, expected):
    assert resolve_protocol(Model(own, method), ProtocolOptions(**options)) == expected


def test_predictor_and_annotate_use_the_protocol_as_given():
    model = Model(STUDENT)
    assert Predictor(model, Protocol()).protocol == Protocol()  # no second resolution: 512 stays 512
    assert Predictor(model, resolve_protocol(model)).protocol == Protocol(short_side=320)
    assert {"own_protocol", "explicit"}.isdisjoint(f.name for f in dataclasses.fields(AnnotateConfig))


def test_make_recipe_takes_the_protocol_as_given():
    r = make_recipe("l.yaml", "out", short_side=64, window=None, protocol="paper", tta=None)
    assert r.protocol == ProtocolOptions(paper=True, short_side=64)  # None: not given
    exact = make_recipe("l.yaml", "out", protocol=Protocol(short_side=64)).protocol  # a Protocol: every field given
    assert resolve_protocol(Model(LSEG), exact) == Protocol(short_side=64)


def test_the_settings_have_one_schema(tmp_path, small_labelset, tiny_weights, monkeypatch):
    """What ``recipe.check`` compares before the model is built is the run's settings, less what
    only the model knows (its method's description)."""
    from seglabel import recipe as recipe_module
    from seglabel.annotate import settings_of

    seen = []
    real = recipe_module.check_settings
    monkeypatch.setattr(recipe_module, "check_settings", lambda out, s, per_image=True: (seen.append(s),
                                                                                        real(out, s, per_image)))
    r = make_recipe(small_labelset, tmp_path / "out", model="maskclip:tiny-vit", model_config=str(TINY_CONFIGS["tiny-vit"]),
                    pretrained=str(tiny_weights["tiny-vit"]), short_side=64, min_confidence=0.3, device="cpu")
    ready = recipe_module.prepare(r)
    [before] = seen
    after = json.loads(json.dumps(settings_of(ready.labelset, ready.segmenter, ready.config)))
    assert json.loads(json.dumps(before)) == {k: v for k, v in after.items() if k != "method"}
    assert list(after) == ["labelset", "model", "weights", "method", "protocol", "min_confidence"]

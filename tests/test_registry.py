"""The model registry: every kind builds from its spec with the options its builder declares, and an
option a kind does not take is refused in one line before anything is loaded (issue 15, design:
`--logit-scale`, `--key-smoothing`, `--prompt-denoising`, `--method` were silently ignored for
`lseg:` and `student:`)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, write_images
from seglabel.labelset import LabelSet
from seglabel.models.registry import NOT_GIVEN, SEGMENTERS, load_segmenter, model_options
from test_annotate_cli import run

LABELS = ["sky", "grass", "road"]

# A value to give each option; the test below fails if a builder grows an option missing here.
SAMPLE_VALUES = {"method": "sclip", "logit_scale": 50.0, "key_smoothing": False, "prompt_denoising": True,
                 "pretrained": "weights.bin", "model_config": "config.json", "cache_dir": "cache", "device": "cpu",
                 "proxy": "dino:vits8", "proxy_weights": "dino.pth", "regions": "slic"}
ALL_OPTIONS = sorted({o for kind in SEGMENTERS for o in model_options(kind)})
NOT_TAKEN = [(kind, option) for kind in SEGMENTERS for option in ALL_OPTIONS if option not in model_options(kind)]


@pytest.fixture(scope="module")
def specs(tmp_path_factory, tiny_weights):
    """kind -> (spec of a tiny model of that kind, the options it needs to build)."""
    from test_deeplab import small_student
    from test_lseg import lightning_checkpoint, small_net

    from seglabel.models.deeplab import student_checkpoint

    folder = tmp_path_factory.mktemp("models")
    torch.save(lightning_checkpoint(small_net("vit")), folder / "lseg.ckpt")
    student, labelset = small_student(classes=LABELS)
    torch.save(student_checkpoint(student, labelset), folder / "student.pt")
    return {
        "maskclip": ("maskclip:tiny-vit", {"pretrained": str(tiny_weights["tiny-vit"]),
                                           "model_config": str(TINY_CONFIGS["tiny-vit"])}),
        "lseg": (f"lseg:{folder / 'lseg.ckpt'}", {}),
        "student": (f"student:{folder / 'student.pt'}", {}),
    }


def test_every_kind_is_covered_and_every_option_has_a_sample(specs):
    assert set(specs) == set(SEGMENTERS)
    assert set(ALL_OPTIONS) <= set(SAMPLE_VALUES), "give the new option a sample value above"
    assert NOT_TAKEN, "every kind takes every option: nothing to refuse"


@pytest.mark.parametrize("kind", list(SEGMENTERS))
def test_each_kind_builds_with_what_the_cli_passes_when_nothing_is_given(specs, kind):
    spec, needed = specs[kind]
    # annotate's flags at their defaults, as the CLI hands them to load_segmenter
    cli_defaults = {"pretrained": "openai", "cache_dir": None, "device": torch.device("cpu"), "model_config": None,
                    "method": "auto", "logit_scale": None, "key_smoothing": None, "prompt_denoising": None,
                    "proxy": None, "proxy_weights": None, "regions": None}
    model = load_segmenter(spec, LabelSet.from_names(LABELS), **{**cli_defaults, **needed})
    assert model.spec == spec and model(torch.randn(1, 3, 64, 64)).shape[1] == len(LABELS)


@pytest.mark.parametrize("kind", list(SEGMENTERS))
def test_each_kind_takes_the_options_it_declares(specs, tmp_path, kind):
    spec, needed = specs[kind]
    given = {"cache_dir": str(tmp_path), "device": "cpu"}
    if kind == "maskclip":
        given.update(method="maskclip", logit_scale=50.0, key_smoothing=False, prompt_denoising=True)
    given = {k: v for k, v in given.items() if k in model_options(kind)}
    model = load_segmenter(spec, LabelSet.from_names(LABELS), **{**given, **needed})
    if kind == "maskclip":
        assert (model.method, model.logit_scale, model.key_smoothing, model.prompt_denoising) == \
            ("maskclip", 50.0, False, True)


@pytest.mark.parametrize("kind, option", NOT_TAKEN, ids=[f"{k}-{o}" for k, o in NOT_TAKEN])
def test_an_option_the_kind_does_not_take_is_refused_before_loading(tmp_path, kind, option):
    missing = tmp_path / "no-such-file"  # nothing is loaded: the refusal comes before the file is looked at
    with pytest.raises(ValueError) as err:
        load_segmenter(f"{kind}:{missing}", **{option: SAMPLE_VALUES[option]})
    message = str(err.value)
    flag = "--" + option.replace("_", "-")
    assert message.startswith(f"{flag} is not an option of {kind} models (it applies to "), message
    assert len(message.splitlines()) == 1 and str(missing) not in message


@pytest.mark.parametrize("kind", list(SEGMENTERS))
def test_not_given_values_are_dropped_and_unknown_options_refused(tmp_path, kind):
    for option, values in NOT_GIVEN.items():
        if option not in model_options(kind):
            for value in values:  # dropped, so the build goes on to the missing file
                with pytest.raises(Exception) as err:
                    load_segmenter(f"{kind}:{tmp_path / 'none'}", **{option: value})
                assert "not an option" not in str(err.value)
    with pytest.raises(ValueError, match=r"^unknown model option 'precision' \("):
        load_segmenter(f"{kind}:{tmp_path / 'none'}", precision="fp16")  # the caller's: annotate's --precision


@pytest.mark.parametrize("kind, flag", [("lseg", "--logit-scale=50"), ("lseg", "--no-key-smoothing"),
                                        ("lseg", "--prompt-denoising"), ("student", "--logit-scale=2"),
                                        ("student", "--key-smoothing")])
@pytest.mark.slow
def test_annotate_refuses_the_flag_in_one_line_and_writes_nothing(specs, tmp_path, small_labelset, kind, flag):
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_images(photos, ["a.png"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--model", specs[kind][0],
            "--out", str(out), "--device", "cpu", flag)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"seglabel: error: {flag.split('=')[0].replace('--no-', '--')} is not an option of "
                           f"{kind} models"), line
    assert not out.exists()

"""seglabel: per-pixel labels for folders of images with open-vocabulary segmenters.

A whole run: ``seglabel.label_folders(inputs, labels, out, **options)`` (``seglabel annotate``
is this call); its dry run: ``plan_folders``. The parts: ``load_labelset``, ``load_segmenter``,
``Predictor`` under a ``Protocol`` (``resolve_protocol``: the one a run would use), ``find_images``,
``evaluate_folders``. ``seglabel.annotate`` is the labelling pipeline's module (its function
``annotate`` labels a list of images with a model already built).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seglabel")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

from .labelset import LabelClass, LabelSet, LabelSetError, load_labelset

# Heavy parts (torch, open_clip) load on first use, so `seglabel labelsets check` stays quick. No
# name here is also the name of a submodule: importing that submodule would replace the name.
_LAZY = {
    "label_folders": "seglabel.folders",
    "plan_folders": "seglabel.folders",
    "Summary": "seglabel.annotate",
    "load_segmenter": "seglabel.models.registry",
    "list_models": "seglabel.models.registry",
    "MaskCLIP": "seglabel.models.maskclip",
    "Predictor": "seglabel.predict",
    "Protocol": "seglabel.predict",
    "ProtocolOptions": "seglabel.predict",
    "resolve_protocol": "seglabel.predict",
    "find_images": "seglabel.images",
    "evaluate_folders": "seglabel.evaluate",
    "SeglabelError": "seglabel.errors",
    "UsageError": "seglabel.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seglabel' has no attribute {name!r}")


__all__ = ["__version__", "LabelClass", "LabelSet", "LabelSetError", "load_labelset", "label_folders", "plan_folders",
           "Summary", "load_segmenter", "list_models", "MaskCLIP", "Predictor", "Protocol", "ProtocolOptions",
           "resolve_protocol", "find_images", "evaluate_folders", "SeglabelError", "UsageError"]

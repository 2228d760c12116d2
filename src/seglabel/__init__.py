"""seglabel: per-pixel labels for folders of images with open-vocabulary segmenters."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seglabel")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

from .labelset import LabelClass, LabelSet, LabelSetError, load_labelset  # noqa: E402


def __getattr__(name: str):
    # Heavy parts (torch, open_clip) load on first use, so `seglabel labelsets check` stays quick.
    lazy = {
        "load_segmenter": ("seglabel.models.registry", "load_segmenter"),
        "list_models": ("seglabel.models.registry", "list_models"),
        "MaskCLIP": ("seglabel.models.maskclip", "MaskCLIP"),
        "Predictor": ("seglabel.predict", "Predictor"),
        "Protocol": ("seglabel.predict", "Protocol"),
        "annotate": ("seglabel.annotate", "annotate"),
        "AnnotateConfig": ("seglabel.annotate", "AnnotateConfig"),
        "find_images": ("seglabel.images", "find_images"),
        "evaluate_folders": ("seglabel.evaluate", "evaluate_folders"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'seglabel' has no attribute {name!r}")


__all__ = ["__version__", "LabelClass", "LabelSet", "LabelSetError", "load_labelset", "load_segmenter",
           "list_models", "MaskCLIP", "Predictor", "Protocol", "annotate", "AnnotateConfig", "find_images",
           "evaluate_folders"]

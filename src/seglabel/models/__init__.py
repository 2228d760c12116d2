from .base import Segmenter
from .registry import DEFAULT_MODEL, SEGMENTERS, list_models, load_segmenter, parse_spec

__all__ = ["Segmenter", "DEFAULT_MODEL", "SEGMENTERS", "list_models", "load_segmenter", "parse_spec"]

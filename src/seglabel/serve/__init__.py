"""``seglabel serve --labelstudio``: an ML backend that gives Label Studio seglabel's labels as
pre-annotations while people open tasks.

``sources`` decides where an image may be read from (the document root, or Label Studio's own
address with its token), ``backend`` turns tasks into brush predictions with one loaded model,
``server`` speaks Label Studio's HTTP protocol. The command (cli.py) builds the model through
``recipe.check`` / ``recipe.prepare``, as annotate does, and hands it over.
"""
from __future__ import annotations

from .backend import Backend, BrushTarget, LabelConfigError, ProjectLabels, project_labels
from .server import BackendServer
from .sources import ImageRefused, ImageSource

__all__ = ["Backend", "BackendServer", "BrushTarget", "ImageRefused", "ImageSource", "LabelConfigError",
           "ProjectLabels", "project_labels"]

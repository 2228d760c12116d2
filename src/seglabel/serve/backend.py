"""The ML backend's work: a project's labeling interface matched to the label set, and a task's
image labelled the way ``seglabel annotate`` labels it, as Label Studio brush predictions.

The model is built once by the caller (``recipe.prepare``, as for annotate) and used by one
request at a time. A task's labels are annotate's for the same image and settings: the same
loading (``images.load_image``), resizing (``predict.prepare_image``, as annotate's loader), model
call and ``predict.to_mask``; the score is the record's confidence (mean top-class probability),
and ``model_version`` is ``seglabel-<settings_id>``, the ``settings_id`` annotate's records carry.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..annotate import AnnotateConfig, settings_of
from ..errors import UsageError
from ..exports.labelstudio import brush_results
from ..images import ImageError, load_image
from ..labelset import LabelSet
from ..models.base import Segmenter
from ..predict import Predictor, prepare_image, resolve_protocol, to_mask
from ..runs import settings_id
from .sources import ImageRefused, ImageSource

log = logging.getLogger("seglabel")


class LabelConfigError(UsageError):
    """A labeling interface the backend cannot predict for (one line: why)."""


@dataclass(frozen=True)
class BrushTarget:
    """One BrushLabels of a labeling interface and the image it paints."""

    from_name: str
    to_name: str
    data_key: str  # the task's data field holding the image URL (<Image value="$image"> -> image)
    names: Mapping[int, str]  # class index -> the project's label of that class


@dataclass(frozen=True)
class ProjectLabels:
    targets: tuple[BrushTarget, ...]
    unknown: tuple[str, ...]  # the project's labels the label set lacks (never predicted)
    absent: tuple[str, ...]  # the label set's classes the project lacks (their pixels stay unlabelled)


def project_labels(label_config: str, labelset: LabelSet) -> ProjectLabels:
    """Each BrushLabels on an Image, its labels matched to the label set by name (exactly, else
    ignoring case)."""
    try:
        view = ET.fromstring(label_config)
    except ET.ParseError as e:
        raise LabelConfigError(f"the labeling interface is not valid XML ({e})") from None
    images = {el.get("name"): el.get("value", "") for el in view.iter() if el.tag == "Image"}
    exact = {c.name: i for i, c in enumerate(labelset.classes) if not c.ignore}
    folded = {name.casefold(): i for name, i in exact.items()}
    targets, unknown, used = [], [], set()
    for brush in (el for el in view.iter() if el.tag == "BrushLabels"):
        value = images.get(brush.get("toName"), "")
        if not value.startswith("$"):
            continue
        names = {}
        for label in brush.iter("Label"):
            name = label.get("value", "")
            k = exact.get(name, folded.get(name.casefold()))
            if k is None:
                unknown.append(name)
            elif k not in names:
                names[k] = name
        used.update(names)
        targets.append(BrushTarget(brush.get("name", ""), brush.get("toName", ""), value[1:], names))
    if not targets:
        raise LabelConfigError("the labeling interface has no BrushLabels on an Image (<Image value=\"$image\">)")
    absent = tuple(labelset.classes[k].name for k in sorted(set(exact.values()) - used))
    return ProjectLabels(tuple(targets), tuple(dict.fromkeys(unknown)), absent)


class Backend:
    """Predictions for Label Studio tasks from one loaded segmenter."""

    def __init__(self, segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig, source: ImageSource) -> None:
        if config.own_protocol:  # LSeg, a student: their own protocol, as annotate resolves it
            config = replace(config, protocol=resolve_protocol(config.protocol, segmenter))
        self.segmenter, self.labelset, self.config, self.source = segmenter, labelset, config, source
        self.predictor = Predictor(segmenter, config.protocol, 1, own_protocol=False)
        self.model_version = "seglabel-" + settings_id(settings_of(labelset, segmenter, config))
        self._lock = threading.Lock()  # one forward pass at a time
        self._projects: dict[str, ProjectLabels] = {}

    def setup(self, label_config: str, project: str = "") -> str:
        self._project(label_config, project)
        return self.model_version

    def predict(self, tasks: Sequence[Mapping[str, Any]], label_config: str, project: str = "") -> list[Any]:
        """One prediction per task, or an empty list for a task whose image could not be labelled
        (Label Studio then stores none for it; the reason is logged)."""
        labels = self._project(label_config, project)
        return [self._predict_task(task, labels) for task in tasks]

    def label(self, url: str) -> tuple[np.ndarray, float]:
        """The mask annotate would write for the image at ``url``, and its confidence."""
        with self.source.open(url) as path:
            rgb = load_image(path, self.config.max_pixels)
        protocol = self.predictor.protocol
        with self._lock, _autocast(self.predictor.device, self.config.precision):
            if protocol.tta:
                [pred] = self.predictor.predict([rgb])
            else:
                x = prepare_image(rgb, protocol, self.segmenter.mean, self.segmenter.std)
                [pred] = self.predictor.predict_prepared([x], [rgb.shape[:2]])
        if not np.isfinite(pred.confidence).all():
            raise ImageRefused(f"{url}: the model gave scores that are not finite numbers (NaN or infinity)")
        return to_mask(pred, self.labelset, self.config.min_confidence), round(float(pred.confidence.mean()), 6)

    def _predict_task(self, task: Mapping[str, Any], labels: ProjectLabels) -> Any:
        data = task.get("data") if isinstance(task, Mapping) else None
        task_id = task.get("id", "?") if isinstance(task, Mapping) else "?"
        results, scores, done = [], [], {}
        try:
            if not isinstance(data, Mapping):
                raise ImageRefused("the task has no data")
            for target in labels.targets:
                if target.data_key not in done:
                    if target.data_key not in data:
                        raise ImageRefused(f"the task has no data field {target.data_key!r}")
                    done[target.data_key] = self.label(data[target.data_key])
                    scores.append(done[target.data_key][1])
                mask = done[target.data_key][0]
                results += brush_results(mask, target.names, target.from_name, target.to_name,
                                         prefix=f"t{task_id}{target.from_name}")
        except (ImageRefused, ImageError) as e:
            log.warning("task %s: %s", task_id, e)
            return []
        return {"result": results, "score": min(scores), "model_version": self.model_version}

    def _project(self, label_config: str, project: str) -> ProjectLabels:
        labels = self._projects.get(label_config)
        if labels is None:
            labels = project_labels(label_config, self.labelset)
            if len(self._projects) > 64:  # many projects over a long life: keep the memory bounded
                self._projects.clear()
            self._projects[label_config] = labels
            if labels.unknown or labels.absent:
                log.warning("project %s: %s", project or "?", _mismatch(labels, self.labelset))
        return labels


def _mismatch(labels: ProjectLabels, labelset: LabelSet) -> str:
    parts = []
    if labels.unknown:
        parts.append(f"labels the label set {labelset.name!r} lacks, never predicted: "
                     + ", ".join(map(repr, labels.unknown)))
    if labels.absent:
        parts.append("classes the project lacks, their pixels left unlabelled: " + ", ".join(map(repr, labels.absent)))
    return "; ".join(parts)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])

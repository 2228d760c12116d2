"""The teacher: the model whose labels the student learns from.

``--teacher auto`` is the model that made ``--pseudo``, rebuilt from its run.json through annotate's
own recipe (``recipe.from_record`` then ``recipe.prepare``), so every option annotate recorded
(method, key smoothing, prompt denoising, logit scale, proxy and its weights, regions, protocol,
min confidence) is the one it labelled with, or the plan refuses in one line. Once built, its
settings are compared with the record's: a teacher that would label differently is refused.

It labels in one of two ways (``labels_mode``):
- online (MaskCLIP+): every augmented crop, as the student sees it (``Teacher.crops``);
- cached: every photo once per scale level (``Teacher.photo``, annotate's Predictor), kept in
  ``OUT/teacher/`` (cache.py), for teachers too slow to run on every crop.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..annotate import settings_of
from ..errors import UsageError
from ..labelset import LabelSet
from ..models.base import Segmenter
from ..models.registry import OWN_PROTOCOL_KINDS, parse_spec
from ..predict import (Predictor, Protocol, ProtocolOptions, prepare_image, resized_size, resolve_protocol,
                       to_mask)
from ..recipe import Checked, Recipe, from_record, prepare


def resolve_teacher(teacher: str | None, run: dict[str, Any]) -> str | None:
    """--teacher auto: the model recorded in --pseudo's run.json (None for a plain mask folder)."""
    if teacher in (None, "", "none"):
        return None
    if teacher == "auto":
        model = run.get("model")
        return model if isinstance(model, str) and ":" in model else None
    return teacher


def teacher_recipe(spec: str, run: dict[str, Any], source: str, labelset: LabelSet, base_size: int,
                   device: str, cache_dir: str | None, overrides: dict[str, str | None]) -> Recipe:
    """The recipe of the teacher ``spec``: the recorded one when it is the model that made --pseudo
    (checked, files found, nothing loaded), else annotate's defaults for ``spec`` at the student's
    scale with the files given."""
    if run and spec == run.get("model"):
        return from_record(run, source, device=device, cache_dir=cache_dir, overrides=overrides)
    kind, _ = parse_spec(spec)
    options = {k: overrides[k] for k in ("proxy_weights", "regions") if overrides.get(k)}
    # a model with a protocol of its own (LSeg, a student) keeps it; the others label at the student's scale
    protocol = ProtocolOptions() if kind in OWN_PROTOCOL_KINDS else ProtocolOptions(short_side=base_size)
    return Recipe(labels=labelset, out=Path(source).parent, protocol=protocol, model=spec,
                  pretrained=overrides.get("pretrained") or ("openai" if kind == "maskclip" else None),
                  model_config=overrides.get("model_config"), cache_dir=cache_dir, device=device,
                  model_options=options)


def known_protocol(recipe: Recipe) -> Protocol:
    """The protocol ``recipe`` gives before its model is built: all of it for a recorded teacher;
    a model's own protocol fills in what was not given when ``prepare`` builds it."""
    return resolve_protocol(None, dataclasses.replace(recipe.protocol, paper=False))


def labels_mode(recipe: Recipe, asked: str) -> str:
    """online or cached. auto: online for a teacher that labels in one pass of one network (a CLIP
    method, a student), cached for one with a second model or regions (ProxyCLIP, CorrCLIP), with
    its own evaluation (LSeg, TTA) or sliding windows: labelling every crop would cost far more than
    the student's training step (CorrCLIP with SLIC: 8x the default method on the toy world)."""
    protocol = known_protocol(recipe)
    heavy = (recipe.model_options.get("proxy") or recipe.model_options.get("regions") or
             recipe.method in ("proxyclip", "corrclip") or parse_spec(recipe.model)[0] == "lseg")
    if asked == "auto":
        return "cached" if heavy or protocol.tta or protocol.window else "online"
    if asked == "online" and (protocol.tta or protocol.window):
        what = "--tta" if protocol.tta else f"--window {protocol.window}"
        raise UsageError(f"--teacher-labels online: the teacher labelled with {what}, which a training crop cannot "
                         f"take; use --teacher-labels cached")
    return asked


def build_teacher(recipe: Recipe, labelset: LabelSet, device: torch.device, recorded: dict[str, Any] | None,
                  source: str) -> "Teacher":
    """The model, built as annotate builds it; with a record, refused unless its settings are the
    record's (so a teacher is never silently another model than the one that labelled)."""
    ready = prepare(recipe, Checked(recipe.labels if isinstance(recipe.labels, LabelSet) else labelset, device))
    if recorded:
        rebuilt = _plain(settings_of(ready.labelset, ready.segmenter, ready.config))
        changed = sorted(k for k in set(rebuilt) | set(recorded) if rebuilt.get(k) != _plain(recorded.get(k)))
        if changed:
            raise UsageError(f"{source}: the teacher rebuilt from it would label with other settings (changed: "
                             f"{', '.join(changed)}); pass --teacher none to train on its masks as written")
    return Teacher(ready.segmenter.eval(), ready.config.protocol, ready.labelset, ready.config.min_confidence)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


class Teacher:
    """A built teacher and how it labels: ``crops`` (online) or ``photo`` (the cache)."""

    def __init__(self, model: Segmenter, protocol: Protocol, labelset: LabelSet, min_confidence: float | None):
        self.model, self.protocol, self.labelset = model, protocol, labelset
        # annotate wrote pixels below this as ignore; the teacher's labels keep that rule
        self.min_confidence = labelset.min_confidence if min_confidence is None else min_confidence

    @torch.no_grad()
    def crops(self, images: torch.Tensor, valid: torch.Tensor, mean, std, ignore_index: int,
              min_confidence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, sureness) of a batch of crops normalised with the student's (mean, std): the
        argmax, ignored on padding, on pixels below the confidence floor and on ignored classes;
        sureness = the margin between the two best classes (scale-free: probabilities saturate)."""
        teacher = self.model
        dev = images.device
        s_mean, s_std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (mean, std))
        t_mean, t_std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        x = ((images * s_std + s_mean) - t_mean) / t_std
        x = F.pad(x, (0, (-x.shape[-1]) % teacher.pad_to, 0, (-x.shape[-2]) % teacher.pad_to))
        logits = F.interpolate(teacher(x).float(), scale_factor=teacher.stride, mode="bilinear", align_corners=False)
        if self.protocol.pamr:
            from ..refine import pamr

            logits = torch.stack([pamr(xi, li) for xi, li in zip(x, logits)])
        logits = logits[..., : images.shape[-2], : images.shape[-1]]
        unsure = valid == ignore_index
        floor = max(min_confidence, self.min_confidence)
        if floor > 0:
            unsure |= logits.softmax(1).amax(1) < floor
        labels = logits.argmax(1)
        ignored = [i for i, c in enumerate(self.labelset.classes) if c.ignore]
        if ignored:
            unsure |= torch.isin(labels, torch.tensor(ignored, device=dev))
        top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
        margin = top2[:, 0] - top2[:, -1]
        return torch.where(unsure, ignore_index, labels), margin

    @torch.no_grad()
    def photos(self, rgbs: list[np.ndarray], short_side: int,
               batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(mask as annotate writes it, confidence, margin) of each photo labelled at ``short_side``
        by annotate's Predictor under the teacher's protocol, at the resized size (not the photo's:
        a photo labelled at twice its size keeps the detail)."""
        protocol = dataclasses.replace(self.protocol, short_side=short_side)
        predictor = Predictor(self.model, protocol, batch_size=batch_size, margins=True)
        sizes = [resized_size(*rgb.shape[:2], protocol) for rgb in rgbs]
        if protocol.tta:  # its own resizing: give it each photo at this scale
            preds = predictor.predict([_resized(rgb, size) for rgb, size in zip(rgbs, sizes)])
        else:
            prepared = [prepare_image(rgb, protocol, self.model.mean, self.model.std, self.model.device) for rgb in rgbs]
            preds = predictor.predict_prepared(prepared, sizes)
        return [(to_mask(pred, self.labelset, self.min_confidence), pred.confidence, pred.margin) for pred in preds]


def _resized(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def ignore_least_sure(target: torch.Tensor, sureness: torch.Tensor, fraction: float,
                      ignore_index: int) -> torch.Tensor:
    """``target`` with, in every class, the ``fraction`` of its labelled pixels whose teacher was
    least sure set to ignore: exactly that many (ties broken by position), so a teacher whose scores
    saturate loses no more than asked. Ranked within each class because a teacher's sureness is not
    comparable across classes: CLIP is less sure of some classes everywhere, and one ranking for all
    would ignore most of those (a CorrCLIP teacher's black toys: 65 %, never learnt)."""
    out = target.flatten().clone()
    scores = sureness.float().flatten()
    for c in torch.unique(out):
        if c == ignore_index:
            continue
        members = (out == c).nonzero().squeeze(1)
        k = int(fraction * len(members))
        if k > 0:
            out[members[scores[members].topk(k, largest=False).indices]] = ignore_index
    return out.view_as(target)

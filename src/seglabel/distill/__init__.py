"""``seglabel distill``: a DeepLabv2 student trained on a teacher's labels, as MaskCLIP+ does.

    from seglabel.distill import DistillConfig, plan, train
    cfg = DistillConfig(images="photos", pseudo="labels", out="runs/street")
    print("\\n".join(plan(cfg).lines()))   # what it would do; refuses what it cannot
    train(cfg)                            # -> runs/street/student.pt (a progress bar from Python)

The parts, each a file: ``config`` (the settings and the rules that choose them), ``plan`` (every
setting resolved and checked once), ``teacher`` (rebuilt through annotate's recipe) and ``cache``
(its labels per photo and scale), ``data`` (the pairs), ``dataset`` (samples and augmentation),
``loss``, ``backbone`` (the student's starting weights), ``state`` (last.pt, the run folder's
files), ``training`` (the loop), ``progress`` and ``validate``.
"""
from .config import DistillConfig, default_iters, poly_lr, scheduled_lr
from .data import DataError
from .loss import colour_affinity_loss, segmentation_loss
from .plan import Plan, plan, resolve_settings
from .training import train

__all__ = ["DistillConfig", "Plan", "plan", "train", "default_iters", "poly_lr", "scheduled_lr", "DataError",
           "segmentation_loss", "colour_affinity_loss", "resolve_settings"]

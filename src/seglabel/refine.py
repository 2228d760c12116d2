"""Training-free refinements of a low-resolution class map (MaskCLIP's prompt denoising and key
smoothing). Both act on the patch grid, before upsampling; prompt denoising comes first."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prompt_denoising(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Remove from each image the classes that are nowhere confident.

    ``logits`` (B, K, h, w) are already multiplied by the softmax temperature. A class whose highest probability over the image is below ``threshold`` gets a very
    low logit everywhere. The best class of each image is never removed, so no pixel is left
    without a class."""
    probs = logits.softmax(dim=1)
    peak = probs.flatten(2).amax(dim=2)  # (B, K)
    keep = peak >= threshold
    keep |= F.one_hot(peak.argmax(dim=1), peak.shape[1]).bool()
    # the official -100 on cosines, times CLIP's temperature of 100
    return logits.masked_fill(~keep[:, :, None, None], -1e4)


def key_smoothing(probs: torch.Tensor, keys: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Smooth uncertain positions with the probabilities of positions whose keys look alike.

    ``probs`` (B, K, h, w), ``keys`` (B, C, h, w). Similarity is the cosine between per-position
    keys (the paper's reading; the official code normalises along the token axis instead).
    Positions whose top probability is below ``threshold`` (1.0: all) take W @ P; one pass."""
    b, k, h, w = probs.shape
    keys = F.normalize(keys.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, C)
    sim = keys @ keys.transpose(1, 2)  # (B, hw, hw)
    flat = probs.flatten(2).transpose(1, 2)  # (B, hw, K)
    smoothed = sim @ flat
    uncertain = flat.amax(dim=-1, keepdim=True) < threshold
    out = torch.where(uncertain, smoothed, flat)
    return out.transpose(1, 2).reshape(b, k, h, w)

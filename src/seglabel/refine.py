"""Training-free refinements of a class map.

MaskCLIP's prompt denoising and key smoothing act on the patch grid, before upsampling (prompt
denoising first). PAMR (pixel-adaptive mask refinement, as NACLIP uses it) acts on logits already
upsampled to the image, guided by the image's colours."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prompt_denoising(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Remove from each image the classes that are nowhere confident.

    ``logits`` (B, K, h, w) are already multiplied by the softmax temperature. A class whose
    highest probability over the image is below ``threshold`` gets a very low logit everywhere.
    The best class of each image is never removed, so no pixel is left without a class."""
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


# Neighbour offsets of a 3x3 stencil (centre last), scaled by each dilation.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(t: torch.Tensor, dilations: tuple[int, ...], centre: bool = False):
    """Views of ``t`` (C, H, W) at each dilated 3x3 neighbour, replicate-padded at the border."""
    h, w = t.shape[-2:]
    for d in dilations:
        padded = F.pad(t[None], (d, d, d, d), mode="replicate")[0]
        for dy, dx in _RING + (((0, 0),) if centre else ()):
            yield padded[:, d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]


def pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """PAMR's affinities (8 * len(dilations), H, W) of a normalised image (3, H, W).

    For neighbour n of pixel p: ``-|I_p - I_n| / (1e-8 + 0.1 * std_p)`` per channel, with std_p the
    unbiased standard deviation over p's dilated 3x3 neighbourhoods (centre included once per
    dilation), averaged over channels, softmax over the neighbours."""
    image = image.float()
    around = list(_shifted(image, dilations, centre=True))
    mean = sum(around) / len(around)
    std = (sum((a - mean) ** 2 for a in around) / (len(around) - 1)).sqrt()
    scores = torch.stack([-(image - n).abs().div(1e-8 + 0.1 * std).mean(dim=0) for n in _shifted(image, dilations)])
    return scores.softmax(dim=0)


def pamr(image: torch.Tensor, logits: torch.Tensor, iterations: int = 10, dilations: tuple[int, ...] = (8, 16),
         max_elements: int = 1 << 24) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020, as NACLIP applies it): ``iterations``
    times, every pixel's logits (K, H, W) become the affinity-weighted sum of its dilated
    neighbours' (not its own), with affinities from the normalised image (3, H, W) of the same size.

    Linear in the logits, so scaling them first changes nothing. Classes do not interact, so they
    are refined a group at a time (about ``max_elements`` floats per working buffer); the affinities
    are computed once."""
    k, h, w = logits.shape
    affinity = pamr_affinity(image, dilations)
    group = max(1, max_elements // max(1, h * w))
    out = torch.empty(k, h, w, dtype=torch.float32, device=logits.device)
    for first in range(0, k, group):
        m = logits[first:first + group].float()
        for _ in range(iterations):
            total = torch.zeros_like(m)
            for a, neighbour in zip(affinity, _shifted(m, dilations)):
                total.addcmul_(neighbour, a[None])
            m = total
        out[first:first + group] = m
    return out

"""Label set -> CLIP text embeddings: prompts put into templates, encoded, averaged per prompt."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .labelset import LabelSet

# MaskCLIP adds these five scene templates to the 80 ImageNet templates of CLIP.
_SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def maskclip_templates() -> tuple[str, ...]:
    """The 85 templates of MaskCLIP: open_clip's OpenAI ImageNet templates, then the scene ones."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) + _SCENE_TEMPLATES


def labelset_templates(labelset: LabelSet) -> tuple[str, ...]:
    return maskclip_templates() if labelset.templates is None else labelset.templates


@torch.no_grad()
def encode_prompts(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """One L2-normalised embedding per prompt: each template filled, encoded, normalised,
    averaged over templates and normalised again (the CLIP zero-shot recipe MaskCLIP uses).
    With no templates the prompt is encoded as it is."""
    templates = list(templates) or ["{}"]
    texts = [t.replace("{}", p) for p in prompts for t in templates]
    chunks = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(texts[i:i + batch_size]).to(device)
        chunks.append(F.normalize(encode_text(tokens).float(), dim=-1))
    per_text = torch.cat(chunks).view(len(prompts), len(templates), -1)
    return F.normalize(per_text.mean(dim=1), dim=-1)


def class_max(prompt_scores: torch.Tensor, prompt_class: Sequence[int], num_classes: int) -> torch.Tensor:
    """Scores per prompt (B, P, ...) -> scores per class (B, K, ...): the best prompt of each class.

    Several prompts for one class stay one class. Taking the max of the cosines is the max of the
    probabilities over a class's prompts, since softmax is monotonic under a shared denominator."""
    index = torch.as_tensor(prompt_class, device=prompt_scores.device)
    if index.numel() == num_classes:  # one prompt per class: nothing to pool
        return prompt_scores
    shape = list(prompt_scores.shape)
    shape[1] = num_classes
    out = prompt_scores.new_full(shape, float("-inf"))
    view = [1, -1] + [1] * (prompt_scores.dim() - 2)
    return out.scatter_reduce(1, index.view(view).expand_as(prompt_scores), prompt_scores, reduce="amax")

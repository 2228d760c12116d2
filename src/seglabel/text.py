"""Label set -> CLIP text embeddings: prompts put into templates, encoded, averaged per prompt."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .checkpoints import cache_dir, content_id
from .labelset import LabelSet, name_key

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


# -- classes the text encoder cannot tell apart ---------------------------------------------------------
def prompt_keys(labelset: LabelSet, tokenize: Callable[[list[str]], torch.Tensor],
                templates: Sequence[str]) -> tuple[list[tuple], int]:
    """What the text encoder sees of each prompt (``labelset.prompts`` order): its token ids in
    every template, after the tokenizer's context cut; and that context length. Prompts are
    tokenized alone first: when no prompt comes near the cut in any template, a prompt's own ids
    decide (the templates add the same text to each); else every templated text is tokenized."""
    templates = list(templates) or ["{}"]
    prompts = labelset.prompts
    alone = tokenize(prompts)
    context = int(alone.shape[1])
    if templates == ["{}"]:
        return [tuple(row) for row in alone.tolist()], context
    added = max(int((tokenize([t.replace("{}", "")]) != 0).sum()) for t in templates)  # with start and end
    if int((alone != 0).sum(dim=1).max()) + added < context:  # no text comes near the cut
        return [tuple(row) for row in alone.tolist()], context
    ids = tokenize([t.replace("{}", p) for p in prompts for t in templates]).tolist()
    n = len(templates)
    return [tuple(tuple(row) for row in ids[k * n:(k + 1) * n]) for k in range(len(prompts))], context


def shadowed_classes(labelset: LabelSet, tokenize: Callable[[list[str]], torch.Tensor],
                     templates: Sequence[str]) -> list[tuple[int, int]]:
    """(j, i) for each class j that can never win a pixel: each of its prompts is, to the text
    encoder (``tokenize``, with its context cut), a prompt of class i listed before it. A class
    scores its best prompt, so j never scores above i, and on a tie argmax takes i."""
    return [(j, i) for j, i, _ in _shadows(labelset, *prompt_keys(labelset, tokenize, templates))]


def _shadows(labelset: LabelSet, keys: list[tuple], context: int) -> list[tuple[int, int, int]]:
    per_class: list[set] = [set() for _ in labelset.classes]
    for k, c in zip(keys, labelset.prompt_class):
        per_class[c].add(k)
    owners: dict[tuple, list[int]] = {}
    for c, ks in enumerate(per_class):
        for k in ks:
            owners.setdefault(k, []).append(c)
    out = []
    for j, ks in enumerate(per_class):
        first = next(iter(ks))
        i = next((i for i in owners[first] if i < j and ks <= per_class[i]), None)
        if i is not None:
            out.append((j, i, context))
    return out


def indistinct_warnings(labelset: LabelSet, tokenize: Callable[[list[str]], torch.Tensor],
                        templates: Sequence[str], model: str = "the text encoder") -> list[str]:
    """One line for each class that can never win a pixel by what ``model``'s tokenizer sees
    (prompts cut at its context length, normalised and lower-cased), beyond what the label set
    itself warns about (prompts equal as text, ``LabelSet.warnings``)."""
    keys, context = prompt_keys(labelset, tokenize, templates)
    lines = []
    for j, i, _ in _shadows(labelset, keys, context):
        mine = {name_key(" ".join(p.split())) for p in labelset.classes[j].prompts}
        if mine <= {name_key(" ".join(p.split())) for p in labelset.classes[i].prompts}:
            continue  # the same prompts as text: the label set's own warning says so
        a, b = labelset.classes[i].name, labelset.classes[j].name
        lines.append(f"{labelset.source}: class {b!r} can never win a pixel: to {model} (whose tokenizer cuts "
                     f"prompts at {context} tokens) each of its prompts is the same as a prompt of {a!r}, listed "
                     f"before it, which wins every tie; give {b!r} a prompt that differs within the first "
                     f"{context} tokens")
    return lines


# -- on-disk cache ------------------------------------------------------------------------------
# Encoding 85 templates x classes takes tens of seconds on a CPU; reruns and shards of one job
# read the result instead. The key covers everything that decides the embeddings.
def text_cache_dir() -> Path | None:
    """``$SEGLABEL_TEXT_CACHE`` (``off`` disables), else ``text`` in seglabel's cache folder."""
    env = os.environ.get("SEGLABEL_TEXT_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    folder = cache_dir()
    return None if folder is None else folder / "text"


def weights_identity(path_or_tag: str | None) -> Any:
    """A local weights file is known by its content (``checkpoints.content_id``, hashed once per
    file version); anything else (a pretrained tag) by its name."""
    if path_or_tag and os.path.isfile(path_or_tag):
        return content_id(path_or_tag)
    return path_or_tag


def cached_text_embeddings(identity: dict[str, Any] | None, prompts: Sequence[str], templates: Sequence[str],
                           compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per (model identity, prompts, templates); later calls read the file.
    ``identity`` None (a model built by hand) or no cache dir: always compute."""
    folder = text_cache_dir()
    if identity is None or folder is None:
        return compute()
    key = json.dumps({"id": identity, "prompts": list(prompts), "templates": list(templates)}, sort_keys=True)
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    from safetensors.torch import load_file, save_file

    try:
        return load_file(str(path))["embeddings"]
    except Exception:  # missing, or a damaged file: recompute and replace it
        pass
    emb = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        save_file({"embeddings": emb.detach().float().cpu().contiguous()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time
    finally:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
    return emb

"""open_clip models with their weights: pretrained tags from the usual caches, or local files.

No network is needed when the weights are cached or given as a file; when they are neither,
``WeightsUnavailable`` says in one line what is missing and how to supply it, without first
spending a minute on download retries.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError, load_weights, state_dict_of
from ..errors import UsageError

_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailable(UsageError):
    """Weights that cannot be had here; the message says how to supply them."""


def register_model_config(path: str | Path) -> str:
    """Register an open_clip architecture from a JSON file; returns its model name (the stem)."""
    import open_clip

    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable model config ({e})") from None
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise UsageError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    open_clip.add_model_config(path)
    return path.stem


def create_clip(name: str, pretrained: str | None = "openai", cache_dir: str | None = None,
                device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Build open_clip model ``name`` with weights from a tag or a file.

    Returns (model in eval mode, tokenizer, info) where info records the weights used."""
    import open_clip

    if open_clip.get_model_config(name) is None:
        raise UsageError(f"unknown open_clip model '{name}' (see `seglabel models`, or pass --model-config FILE.json)")
    info: dict[str, Any] = {"model": name, "pretrained": pretrained}
    quick_gelu = False
    weights_file: str | None = None
    if pretrained and Path(pretrained).is_file():
        weights_file = pretrained
    elif pretrained:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise WeightsUnavailable(
                f"'{pretrained}' is neither a weight file nor a pretrained tag of {name} (tags: {tags})")
        # OpenAI weights were trained with QuickGELU; the plain configs use nn.GELU.
        quick_gelu = bool(cfg.get("quick_gelu")) and not open_clip.get_model_config(name).get("quick_gelu")
        weights_file = _cached_or_download(name, pretrained, cfg, cache_dir)
        info["preprocess"] = {k: cfg[k] for k in ("mean", "std") if k in cfg}
    with _without_random_init_warning():  # open_clip warns "initialized randomly": the weights come next
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    if weights_file:
        try:
            sd = state_dict_of(load_weights(weights_file), weights_file)
            for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's own archives
                sd.pop(key, None)
            model.load_state_dict(sd, strict=True)
        except CheckpointError:
            raise
        except RuntimeError as e:
            raise CheckpointError(f"{weights_file}: does not fit {name}: {_first_line(e)}") from None
        info["weights_file"] = str(weights_file)
    if "preprocess" in info:
        model.visual.preprocess_cfg = {**getattr(model.visual, "preprocess_cfg", {}), **info["preprocess"]}
    info["quick_gelu"] = quick_gelu or bool(open_clip.get_model_config(name).get("quick_gelu"))
    model = model.to(device).eval()
    return model, open_clip.get_tokenizer(name), info


def text_encoder(model: torch.nn.Module):
    """``encode_text`` that runs only as many token positions as the longest prompt needs.

    CLIP's text tower is causal and pools at the end-of-text token, so positions after it change
    nothing: trimming the padding gives the same embeddings several times faster (prompts are
    ~15 of 77 tokens). Models without that structure use their own ``encode_text``."""
    import open_clip

    standard = (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
                and getattr(model, "text_pool_type", "argmax") == "argmax" and not getattr(model, "text_no_grad", False))
    if not standard:
        return model.encode_text

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        length = int((tokens != 0).sum(dim=1).max())  # 0 is padding for the CLIP tokenizer
        tokens = tokens[:, :max(1, length)]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end-of-text token
        proj = model.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else (x @ proj if proj is not None else x)

    return encode


def _cached_or_download(name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None) -> str:
    from open_clip.pretrained import download_pretrained

    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        cached = _hf_cached(repo, [filename] if filename else list(_HF_WEIGHT_FILES), cache_dir)
        if cached:
            return cached
    how = _how_to_supply(name, tag, cfg, cache_dir)
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise WeightsUnavailable(f"weights '{tag}' for {name} are not cached and the model hub cannot be reached: {how}")
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise WeightsUnavailable(f"could not download weights '{tag}' for {name} ({_first_line(e)}): {how}") from None


def _how_to_supply(name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None) -> str:
    """The rest of the missing-weights line: where seglabel looked, the command that fetches the
    weights where there is network, the -quickgelu rule for weight files, and the offline demo."""
    quick = f"{name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("-quickgelu") else name
    return (f"looked in {_hub_cache(cache_dir)}; on a machine with network run "
            f"`python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"` and copy "
            f"that folder here (or set HF_HOME / --cache-dir to a copy), or pass the file: "
            f"--model maskclip:{quick} --pretrained FILE (weights trained with QuickGELU, as OpenAI's, need the "
            f"-quickgelu name). To try seglabel without weights, run the toy demo in the README")


def _hub_cache(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return HF_HUB_CACHE
    except ImportError:
        return os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def _hf_cached(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _without_random_init_warning():
    """open_clip's "Model initialized randomly" (logged on the root logger) left out; everything
    else it logs still goes where the application's logging sends it."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

"""``seglabel preview``: a static HTML contact sheet of an annotate output, least confident first.

Writes ``OUT/preview/``: ``index.html`` (page 1) and ``page-N.html``, ``style.css``,
``thumbs/<key>.jpg`` and ``full/<key>.jpg`` (the photo under its labels at 50%, ignored pixels
striped magenta). Only relative links, nothing from the network, so it opens from ``file://``;
pages of ``per_page`` cards with lazily loaded thumbnails keep 100,000 images usable.
Reruns redraw only the overlays whose mask changed (``preview/rendered.json``). A run in a bucket
is previewed into a local ``--dest`` folder.
"""
from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image

from .exports.run_output import ImageEntry, RunOutput, load_rgb, read_mask, read_output
from . import storage
from .errors import UsageError
from .labelset import LabelSet
from .writers import MASKS, RECORDS, write_bytes, write_json

PREVIEW = "preview"
IGNORE_STRIPE = (255, 0, 255)  # magenta: no class colour of the shipped label sets is this loud
NO_PHOTO_GREY = 128


@dataclass
class PreviewResult:
    index: Path
    images: int
    pages: int
    drawn: int  # overlays drawn this time (the rest were up to date)
    missing_photos: list[str]  # file names whose photo was not found (drawn on grey)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): masks not shown (run_output)


def build_preview(out: str | Path, image_roots: Sequence[str | Path] = (), per_page: int = 100,
                  thumb_size: int = 320, jobs: int = 1, dest: str | Path | None = None) -> PreviewResult:
    """Draw what is not up to date (in ``jobs`` processes; 0 = one per CPU) and write the pages
    into ``dest`` (default ``OUT/preview``; a run in a bucket needs a local ``dest``: its masks and
    photos are copied under ``dest/files`` to be drawn and linked)."""
    if per_page < 1:
        raise UsageError(f"per_page must be at least 1, got {per_page}")
    remote = storage.is_remote(str(out))
    if remote and dest is None:
        raise UsageError(f"{storage.redact(str(out))}: a run in a bucket is previewed into a local folder: give --dest DIR")
    if dest is not None and storage.is_remote(str(dest)):
        raise UsageError(f"--dest {storage.redact(str(dest))}: give a local folder (a browser opens the pages from there)")
    folder = Path(dest) if dest is not None else Path(storage.local_path(str(out)) or out) / PREVIEW
    # masks and photos read from a store are copied beside the pages (the pages link them)
    run = read_output(out, image_roots, stage=folder / "files")
    state_file = folder / "rendered.json"
    previous = _read_state(state_file)
    entries = run.sorted_worst_first()
    photos: dict[str, Path | None] = {}
    todo: list[tuple[str, _Drawing, list]] = []
    state: dict[str, list] = {}
    for entry in entries:
        photo = photos[entry.key] = run.images.find(entry.file_name)
        stamp = [run.version(f"{MASKS}/{entry.key}.png"), run.version(f"{RECORDS}/{entry.key}.json"), bool(photo)]
        thumb, full = folder / "thumbs" / f"{entry.key}.jpg", folder / "full" / f"{entry.key}.jpg"
        if previous.get(entry.key) == stamp and thumb.is_file() and full.is_file():
            state[entry.key] = stamp
        else:
            todo.append((entry.key, _Drawing(run.mask_path(entry), photo, full, thumb, run.labelset, thumb_size), stamp))
    try:
        for (key, _, stamp), photo_read in zip(todo, _draw_all([d for _, d, _ in todo], jobs)):
            stamp[2] = photo_read  # an unreadable photo is drawn on grey, and retried next time
            state[key] = stamp
    finally:  # an interrupted preview keeps what it drew
        write_json(state_file, state)
    missing = [e.file_name for e in entries if not state[e.key][2]]
    pages = [entries[i:i + per_page] for i in range(0, len(entries), per_page)]
    links = {k: os.path.relpath(p, folder) if p and state[k][2] else None for k, p in photos.items()}
    write_bytes(folder / "style.css", STYLE.encode())
    for number, cards in enumerate(pages, start=1):
        first = (number - 1) * per_page + 1
        page = render_page(run, cards, links, number, len(pages), first, thumb_size, len(entries), len(missing))
        write_bytes(folder / page_name(number), page.encode())
    _remove_stale_pages(folder, len(pages))
    return PreviewResult(folder / "index.html", len(entries), len(pages), len(todo), missing, run.left_out)


def page_name(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number}.html"


# -- overlays ---------------------------------------------------------------------------------------
def class_colors(labelset: LabelSet) -> np.ndarray:
    """(ignore index + 1, 3) uint8 lookup table: class index -> colour."""
    colors = np.zeros((labelset.ignore_index + 1, 3), dtype=np.uint8)
    colors[: len(labelset)] = labelset.palette
    return colors


def render_overlay(rgb: np.ndarray | None, mask: np.ndarray, labelset: LabelSet, alpha: float = 0.5) -> np.ndarray:
    """The photo (or grey, without one) under the class colours at ``alpha``; ignored pixels get
    magenta diagonal stripes over the darkened photo, so they are seen, not mistaken for a class."""
    h, w = mask.shape
    if rgb is None:
        base = np.full((h, w, 3), NO_PHOTO_GREY, dtype=np.float32)
    else:
        if rgb.shape[:2] != (h, w):  # should not happen: masks have the photo's size
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        base = rgb.astype(np.float32)
    out = (1 - alpha) * base + alpha * class_colors(labelset)[mask].astype(np.float32)
    ignored = mask == labelset.ignore_index
    if ignored.any():
        ys, xs = np.nonzero(ignored)
        band = max(4, max(h, w) // 64)  # wide enough to stay stripes in a thumbnail
        stripe = ((ys + xs) // band) % 2 == 0
        out[ys, xs] = base[ys, xs] * 0.35
        out[ys[stripe], xs[stripe]] = IGNORE_STRIPE
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Drawing:
    """One image's overlays to draw; plain data, so it can go to a worker process."""
    mask: Path
    photo: Path | None
    full: Path
    thumb: Path
    labelset: LabelSet
    thumb_size: int


def _draw(d: _Drawing) -> bool:
    """Writes the full-size overlay and its thumbnail; returns whether the photo was read."""
    rgb = load_rgb(d.photo) if d.photo else None
    img = Image.fromarray(render_overlay(rgb, read_mask(d.mask), d.labelset))
    write_bytes(d.full, _jpeg(img, 88))
    img.thumbnail((d.thumb_size, d.thumb_size), Image.LANCZOS)
    write_bytes(d.thumb, _jpeg(img, 85))
    return rgb is not None


def _draw_all(drawings: list[_Drawing], jobs: int) -> Iterator[bool]:
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(drawings) < 2:
        yield from map(_draw, drawings)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(drawings))) as pool:
        yield from pool.map(_draw, drawings, chunksize=8)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _read_state(path: Path) -> dict[str, list]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}  # no or damaged state: everything is drawn again


def _remove_stale_pages(folder: Path, pages: int) -> None:
    """Pages past the last one, left by an earlier preview of more images or smaller pages."""
    for path in folder.glob("page-*.html"):
        number = path.stem.removeprefix("page-")
        if number.isdigit() and int(number) > pages:
            path.unlink(missing_ok=True)


# -- HTML -------------------------------------------------------------------------------------------
def _hex(color) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in color)


def _url(path: str) -> str:
    return quote(path.replace(os.sep, "/"))


def render_page(run: RunOutput, cards: list[ImageEntry], photos: dict[str, str | None], number: int,
                pages: int, first: int, thumb_size: int, total: int, missing: int) -> str:
    ls = run.labelset
    title = f"seglabel preview: {ls.name}"
    nav = _nav(number, pages)
    corrected = sum(1 for e in run.entries if e.corrected)
    order = "least confident first" + (f", then the {corrected} corrected by a person" if corrected else "")
    summary = (f"{total} images, {order}. Page {number} of {pages}: images "
               f"{first}&ndash;{first + len(cards) - 1}.")
    if missing:
        summary += (f" {missing} photos were not found and are drawn on grey"
                    " (pass <code>--images DIR</code> to seglabel preview).")
    legend = "".join(f'<li><span class="swatch" style="background:{_hex(c.color)}"></span>'
                     f'{i}&nbsp;{html.escape(c.name)}</li>' for i, c in enumerate(ls.classes))
    legend += f'<li><span class="swatch ignore"></span>{ls.ignore_index}&nbsp;ignored</li>'
    body = "\n".join(_card(run, e, photos.get(e.key), thumb_size) for e in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} (page {number})</title>
<link rel="stylesheet" href="style.css"></head>
<body>
<header><h1>{html.escape(title)}</h1><p class="summary">{summary}</p>
<ul class="legend">{legend}</ul>{nav}</header>
<main class="cards">
{body}
</main>
<footer>{nav}</footer>
</body></html>
"""


def _nav(number: int, pages: int) -> str:
    if pages == 1:
        return ""
    links = []
    for label, target, rel in (("&laquo; first", 1, "first"), ("&lsaquo; previous", number - 1, "prev"),
                               ("next &rsaquo;", number + 1, "next"), ("last &raquo;", pages, "last")):
        if 1 <= target <= pages and target != number:
            links.append(f'<a rel="{rel}" href="{page_name(target)}">{label}</a>')
        else:
            links.append(f'<span class="off">{label}</span>')
    links.insert(2, f"<span>page {number} of {pages}</span>")
    return f'<nav class="pages">{" ".join(links)}</nav>'


def _card(run: RunOutput, e: ImageEntry, photo: str | None, thumb_size: int) -> str:
    ls = run.labelset
    scale = min(1.0, thumb_size / max(e.width, e.height, 1))
    tw, th = max(1, round(e.width * scale)), max(1, round(e.height * scale))
    shares = [(ls.classes[k].name if k < len(ls) else f"class {k}",
               _hex(ls.classes[k].color) if k < len(ls) else "#000000", a / max(e.pixels, 1))
              for k, a in sorted(e.areas, key=lambda ka: -ka[1])]
    bar = "".join(f'<span style="width:{100 * s:.2f}%;background:{c}" title="{html.escape(n)} {100 * s:.1f}%"></span>'
                  for n, c, s in shares)
    ignored = e.ignored_pixels / max(e.pixels, 1)
    if ignored > 0:
        bar += f'<span class="ignore" style="width:{100 * ignored:.2f}%" title="ignored {100 * ignored:.1f}%"></span>'
    top = " &middot; ".join(f"{html.escape(n)} {100 * s:.0f}%" for n, _, s in shares[:3])
    conf = "&ndash;" if e.confidence is None else f"{e.confidence:.3f}"
    data_conf = "" if e.confidence is None else f' data-confidence="{e.confidence:.6f}"'
    full, thumb = _url(f"full/{e.key}.jpg"), _url(f"thumbs/{e.key}.jpg")
    links = [f'<a href="{full}">overlay</a>', f'<a href="{_url(f"../masks/{e.key}.png")}">mask</a>']
    if photo:
        links.append(f'<a href="{_url(photo)}">photo</a>')
    else:
        links.append('<span class="off">photo not found</span>')
    badge, kind = _badge(e.corrected), ' corrected' if e.corrected else ''
    return (f'<article class="card{kind}" data-key="{html.escape(e.key)}"{data_conf}>'
            f'<a href="{full}"><img src="{thumb}" loading="lazy" width="{tw}" height="{th}" '
            f'alt="{html.escape(e.file_name)}"></a>'
            f'<div class="bar">{bar}</div>'
            f'<p class="meta">{badge}<span class="conf" title="mean top-class probability">{conf}</span> '
            f'<span class="name">{html.escape(e.file_name)}</span></p>'
            f'<p class="classes">{top}</p><p class="links">{" &middot; ".join(links)}</p></article>')


def _badge(corrected: dict | None) -> str:
    """A mark on the card of a mask a person made: who, with what, when (records.py)."""
    if not corrected:
        return ""
    tool, when = corrected.get("tool") or "", corrected.get("when") or ""
    title = "corrected by a person" + (f" in {tool}" if tool else "") + (f", {when}" if when else "")
    return f'<span class="badge" title="{html.escape(title)}">corrected</span> '


STYLE = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1rem 2rem; color: #222; background: #fafafa; }
h1 { font-size: 1.3rem; margin: 1rem 0 .3rem; }
.summary { margin: 0 0 .5rem; color: #555; }
.legend { list-style: none; padding: 0; margin: 0 0 .5rem; display: flex; flex-wrap: wrap; gap: .3rem 1rem; }
.legend li { display: flex; align-items: center; gap: .3rem; }
.swatch { display: inline-block; width: 1rem; height: 1rem; border: 1px solid #0004; }
.ignore { background: repeating-linear-gradient(45deg, #ff00ff 0 4px, #333 4px 8px); }
.pages { margin: .5rem 0; display: flex; gap: 1rem; }
.off { color: #aaa; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: .8rem; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: .4rem; }
.card img { display: block; width: 100%; height: auto; background: #eee; }
.bar { display: flex; height: 10px; margin: .4rem 0 .2rem; border: 1px solid #0003; }
.bar span { display: block; height: 100%; }
.meta, .classes, .links { margin: .1rem 0; overflow-wrap: anywhere; }
.conf { font-weight: 600; font-variant-numeric: tabular-nums; }
.classes { color: #555; font-size: 12px; }
.badge { background: #1b7f3b; color: #fff; border-radius: 3px; padding: 0 .3rem; font-size: 12px; }
.card.corrected { border-color: #1b7f3b; }
"""

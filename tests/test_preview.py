"""`seglabel preview`: the HTML contact sheet, its overlays and pages, and the page in a real
headless browser (Debian's chromium driven by Playwright)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglabel.labelset import parse_labelset
from seglabel.preview import IGNORE_STRIPE, build_preview, render_overlay
from test_annotate_cli import annotate, run
from test_export import STREET, make_output


class Page(HTMLParser):
    """The cards (key, confidence), every src/href, and the nav links of one page."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.cards, self.links, self.nav = [], [], {}
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article":
            conf = a.get("data-confidence")
            self.cards.append((a["data-key"], None if conf is None else float(conf)))
        for name in ("src", "href"):
            if name in a:
                self.links.append(a[name])
        if tag == "a" and a.get("rel"):
            self.nav[a["rel"]] = a["href"]


def masks_with_confidence():
    masks = {f"img{i}": np.full((12, 16), i % 3, dtype=np.uint8) for i in range(5)}
    masks["img1"][:4, :4] = 255
    return masks, {"img0": 0.8, "img1": 0.3, "img2": 0.95, "img3": 0.5, "img4": 0.61}


def relative_targets_exist(page: Path, links: list[str]) -> None:
    from urllib.parse import unquote

    for link in links:
        assert not re.match(r"^[a-z]+:", link) and not link.startswith("/"), link  # relative only
        assert (page.parent / unquote(link)).is_file(), link


# -- the page ---------------------------------------------------------------------------------------
def test_cards_least_confident_first_with_working_relative_links(tmp_path):
    masks, conf = masks_with_confidence()
    out = make_output(tmp_path, masks, confidence=conf)
    result = build_preview(out, per_page=100)
    page = Page(result.index)
    assert [k for k, _ in page.cards] == ["img1", "img3", "img4", "img0", "img2"]
    assert [c for _, c in page.cards] == sorted(conf.values())
    relative_targets_exist(result.index, page.links)
    assert result.index == out / "preview" / "index.html" and result.missing_photos == []
    html = result.index.read_text()
    assert html.count('loading="lazy"') == 5
    for name in ("background", "road", "person", "ignored"):
        assert name in html  # the legend


def test_class_shares_bar(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[:3] = 1  # 30% road
    mask[3:4] = 255  # 10% ignored
    out = make_output(tmp_path, {"a": mask})
    html = build_preview(out).index.read_text()
    bar = re.search(r'<div class="bar">(.*?)</div>', html).group(1)
    assert re.findall(r'width:([\d.]+)%;background:(#\w+)', bar) == [("60.00", "#0a141e"), ("30.00", "#804080")]
    assert 'class="ignore" style="width:10.00%"' in bar


def test_paging_and_stale_pages(tmp_path):
    masks, conf = masks_with_confidence()
    out = make_output(tmp_path, masks, confidence=conf)
    result = build_preview(out, per_page=2)
    assert result.pages == 3
    pages = [out / "preview" / n for n in ("index.html", "page-2.html", "page-3.html")]
    seen = []
    for i, path in enumerate(pages):
        page = Page(path)
        seen += [k for k, _ in page.cards]
        relative_targets_exist(path, page.links)
        assert ("next" in page.nav) == (i < 2) and ("prev" in page.nav) == (i > 0)
    assert seen == ["img1", "img3", "img4", "img0", "img2"]
    assert Page(pages[0]).nav["next"] == "page-2.html" and Page(pages[2]).nav["prev"] == "page-2.html"
    build_preview(out, per_page=4)
    assert not pages[2].exists() and pages[1].exists()


def test_rerun_draws_only_what_changed(tmp_path):
    masks, conf = masks_with_confidence()
    out = make_output(tmp_path, masks, confidence=conf)
    assert build_preview(out, jobs=2).drawn == 5  # in two worker processes
    assert len(list((out / "preview" / "thumbs").glob("*.jpg"))) == 5
    assert build_preview(out).drawn == 0
    os.utime(out / "masks" / "img3.png", ns=(1, 1))  # as if relabelled
    assert build_preview(out).drawn == 1


def test_outputs_without_confidence_still_preview(tmp_path):
    masks, conf = masks_with_confidence()
    out = make_output(tmp_path, masks, confidence=conf)
    for key in ("img1", "img2"):
        path = out / "records" / f"{key}.json"
        record = json.loads(path.read_text())
        del record["confidence"]
        path.write_text(json.dumps(record))
    page = Page(build_preview(out).index)
    assert page.cards == [("img3", 0.5), ("img4", 0.61), ("img0", 0.8), ("img1", None), ("img2", None)]


def test_missing_photos_are_drawn_on_grey_and_found_with_images(tmp_path):
    masks, conf = masks_with_confidence()
    out = make_output(tmp_path, masks, confidence=conf)
    (tmp_path / "photos").rename(tmp_path / "moved")
    result = build_preview(out)
    assert len(result.missing_photos) == 5 and "not found" in result.index.read_text()
    thumb = np.asarray(Image.open(out / "preview" / "full" / "img0.jpg")).astype(int)
    assert abs(thumb - (np.array(STREET["classes"][0]["color"]) + 128) / 2).max() <= 4  # grey under colour
    result = build_preview(out, image_roots=[tmp_path / "moved"])
    assert result.missing_photos == [] and result.drawn == 5
    page = Page(result.index)
    assert "../../moved/img0.jpg" in page.links  # the photo, relative to the page
    relative_targets_exist(result.index, page.links)


# -- overlays ---------------------------------------------------------------------------------------
def test_overlay_blends_half_and_stripes_ignored_pixels():
    ls = parse_labelset(STREET)
    rgb = np.full((20, 20, 3), 100, np.uint8)
    mask = np.ones((20, 20), np.uint8)
    mask[10:] = 255
    img = render_overlay(rgb, mask, ls).astype(int)
    np.testing.assert_allclose(img[:10].reshape(-1, 3), np.tile((np.array([128, 64, 128]) + 100) / 2, (200, 1)), atol=1)
    ignored = img[10:].reshape(-1, 3)
    magenta = (ignored == IGNORE_STRIPE).all(axis=1)
    assert 0.3 < magenta.mean() < 0.7  # stripes: part magenta, part darkened photo
    assert not (img[:10].reshape(-1, 3) == IGNORE_STRIPE).all(axis=1).any()


def test_preview_command_on_a_real_annotate_run(tmp_path, tiny_weights, small_labelset):
    from conftest import write_images

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "x/b.png", "c.jpg"], size=(30, 44))
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    r = run("preview", str(out), "--per-page", "2")
    assert r.returncode == 0, r.stderr
    index = out / "preview" / "index.html"
    assert r.stdout.strip() == str(index)
    confidences = {k: json.loads((out / "records" / f"{k}.json").read_text())["confidence"] for k in ("a", "x/b", "c")}
    cards = Page(index).cards + Page(out / "preview" / "page-2.html").cards
    assert [k for k, _ in cards] == sorted(confidences, key=confidences.get)
    full = Image.open(out / "preview" / "full" / "x" / "b.jpg")
    assert full.size == (44, 30)
    r = run("preview", str(tmp_path / "photos"))
    assert r.returncode == 2 and "run.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- in a real browser --------------------------------------------------------------------------------
def chromium() -> str:
    """Debian's chromium; under CI a missing browser fails the test instead of skipping it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        reason = "needs Debian's chromium (apt-get install chromium) and playwright (pip install playwright)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_page_in_a_headless_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    masks, conf = masks_with_confidence()
    masks = {k: np.kron(m, np.ones((8, 8), np.uint8)) for k, m in masks.items()}  # 96 x 128 px
    out = make_output(tmp_path, masks, confidence=conf)
    index = build_preview(out, per_page=3).index
    shot = tmp_path / "preview.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            failed, errors = [], []
            page.on("requestfailed", lambda req: failed.append(req.url))
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            keys = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.key)")
            shown = page.eval_on_selector_all(".card", "cards => cards.map(c => +c.dataset.confidence)")
            assert keys == ["img1", "img3", "img4"] and shown == sorted(shown)
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            sizes = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
            assert sizes == [[128, 96]] * 3
            # the overlay drawn in the page: the card of img1 shows its magenta ignored corner
            # the overlay as the page shows it: img1's ignored top-left corner is striped magenta
            drawn = np.asarray(Image.open(io.BytesIO(page.locator(".card img").first.screenshot())).convert("RGB"))
            h, w = drawn.shape[:2]
            corner, rest = drawn[: h // 4, : w // 5].reshape(-1, 3).astype(int), drawn[h // 2:].reshape(-1, 3).astype(int)
            magenta = lambda px: ((px[:, 0] > 200) & (px[:, 1] < 80) & (px[:, 2] > 200)).mean()  # noqa: E731
            assert magenta(corner) > 0.2 and magenta(rest) == 0
            page.screenshot(path=str(shot), full_page=True)
            page.click("a[rel=next] >> nth=0")
            page.wait_for_load_state("load")
            assert page.url.endswith("page-2.html")
            assert page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.key)") == ["img0", "img2"]
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert failed == [] and errors == []
        finally:
            browser.close()
    png = Image.open(io.BytesIO(shot.read_bytes()))
    assert png.format == "PNG" and png.size[0] == 1200 and shot.stat().st_size > 10_000
    assert np.asarray(png.convert("RGB")).std() > 20  # not a blank page


def test_sixteen_bit_masks_preview(tmp_path):
    """Past 254 classes masks are 16-bit and 65535 is ignored; class 299 gets its own colour."""
    labelset = {"name": "big", "templates": "none", "classes": [f"c{i}" for i in range(300)]}
    mask = np.full((64, 64), 299, np.uint16)
    mask[:8] = 65535
    out = make_output(tmp_path, {"a": mask}, labelset)
    build_preview(out)
    full = np.asarray(Image.open(out / "preview" / "full" / "a.jpg")).astype(int)
    ls = parse_labelset(labelset)
    photo = np.asarray(Image.open(tmp_path / "photos" / "a.jpg")).astype(int)
    expected = (photo[32:] + np.array(ls.classes[299].color)) / 2  # rows away from the stripes
    # per-channel means: the random photo's JPEG noise averages out
    assert np.abs(full[32:].mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() < 3
    stripes = (full[:6, :, 0] > 200) & (full[:6, :, 1] < 90) & (full[:6, :, 2] > 200)
    assert stripes.mean() > 0.2  # 65535 is drawn as ignored
    assert "65535&nbsp;ignored" in (out / "preview" / "index.html").read_text()

"""Hugging Face: a dataset folder laid out as on the Hub, written with pyarrow alone.

``data/train-00000-of-00003.parquet``, ...: one row per image, with ``image`` (the photo's bytes
as they are) and ``label`` (the mask: grayscale PNG of class indices, 255, or 65535 past 254
classes, = ignored) as ``Image`` features, ``key`` (seglabel's), ``file_name``, ``width``,
``height``, ``confidence`` and ``classes`` (the classes present, a list of ``ClassLabel`` that
carries the class names). The features are in each file's schema as ``datasets`` writes them
(the ``huggingface`` metadata), so ``Dataset.from_parquet`` and ``load_dataset("parquet", ...)``
give Image and ClassLabel columns; ``README.md``, the dataset card, says the same in its YAML
(``configs``, ``dataset_info``), which ``load_dataset(folder)``, the Hub and ``push_to_hub`` read.
``id2label.json`` maps pixel values to class names, as transformers' segmentation models take
them. Row groups of at most 100 images (as ``datasets`` writes image data) keep reading memory small.

The old features encoding (``Sequence``) is written, which every ``datasets`` version reads.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import UsageError
from ..images import printable
from ..writers import atomic_path, write_bytes, write_json
from .run_output import RunOutput
from .shards import Plan, Sample, clear_stale, id2label, read_samples

SPLIT = "train"
DATA = "data"
SHARD = re.compile(rf"{SPLIT}-\d{{5}}-of-\d{{5}}\.parquet")
ROW_GROUP_IMAGES, ROW_GROUP_BYTES = 100, 128 << 20
CARD = "README.md"


def require_pyarrow() -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError("--format hf needs pyarrow: pip install 'seglabel[hf]'") from None


def features(run: RunOutput) -> dict[str, Any]:
    """The columns as ``datasets.Features.to_dict`` writes them."""
    string, image = {"dtype": "string", "_type": "Value"}, {"_type": "Image"}
    return {"image": image, "label": image, "key": string, "file_name": string,
            "width": {"dtype": "int32", "_type": "Value"}, "height": {"dtype": "int32", "_type": "Value"},
            "confidence": {"dtype": "float64", "_type": "Value"},
            "classes": {"feature": {"names": run.labelset.names, "_type": "ClassLabel"}, "_type": "Sequence"}}


def _schema(run: RunOutput):
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("image", image), ("label", image), ("key", pa.string()), ("file_name", pa.string()),
              ("width", pa.int32()), ("height", pa.int32()), ("confidence", pa.float64()),
              ("classes", pa.list_(pa.int64()))]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features(run)}})})


def shard_name(index: int, total: int) -> str:
    return f"{SPLIT}-{index:05d}-of-{total:05d}.parquet"


def write_hf(run: RunOutput, dest: Path, plan: Plan,
             on_image: Callable[[], None] | None = None) -> tuple[int, list[str]]:
    """Writes the parquet shards, then ``id2label.json`` and the card; returns the number of
    images written and notes for the user."""
    schema = _schema(run)
    names, written, sizes = [], 0, {"num_bytes": 0, "download_size": 0}
    for index, samples in enumerate(plan.shards):
        name = shard_name(index, len(plan.shards))
        n, nbytes = _write_shard(run, dest / DATA / name, schema, samples, plan, on_image)
        written += n
        sizes["num_bytes"] += nbytes
        sizes["download_size"] += os.path.getsize(dest / DATA / name)
        names.append(name)
    clear_stale(dest / DATA, SHARD, names)
    write_json(dest / "id2label.json", id2label(run))
    write_bytes(dest / CARD, card(run, written, **sizes).encode("utf-8"))
    notes = plan.notes()
    notes.append(f"load with datasets.load_dataset('{dest}'); set the photos' licence in {dest / CARD} "
                 "(license: unknown) before uploading it to the Hub")
    return written, notes


def _write_shard(run: RunOutput, path: Path, schema, samples: list[Sample], plan: Plan,
                 on_image: Callable[[], None] | None) -> tuple[int, int]:
    """Returns the images written and their size in Arrow (``datasets``' ``num_bytes``)."""
    import pyarrow.parquet as pq

    written = nbytes = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = pq.ParquetWriter(f, schema)
            try:
                rows: list[dict[str, Any]] = []
                size = 0
                for sample, photo, mask in read_samples(run, samples, plan):
                    rows.append(_row(sample, photo, mask))
                    size += len(photo) + len(mask)
                    written += 1
                    on_image and on_image()
                    if len(rows) >= ROW_GROUP_IMAGES or size >= ROW_GROUP_BYTES:
                        nbytes += _write_rows(writer, rows, schema)
                        rows, size = [], 0
                if rows:
                    nbytes += _write_rows(writer, rows, schema)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
    return written, nbytes


def _write_rows(writer, rows: list[dict[str, Any]], schema) -> int:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=schema)
    writer.write_table(table)
    return table.nbytes


def _row(sample: Sample, photo: bytes, mask: bytes) -> dict[str, Any]:
    e = sample.entry
    key = printable(e.key)
    return {"image": {"bytes": photo, "path": e.file_name}, "label": {"bytes": mask, "path": f"{key}.png"},
            "key": key, "file_name": e.file_name, "width": e.width, "height": e.height,
            "confidence": e.confidence, "classes": [k for k, _ in e.areas]}


# -- the dataset card ---------------------------------------------------------------------------
def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    bounds = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
              (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1B")


def card_metadata(run: RunOutput, images: int, num_bytes: int = 0, download_size: int = 0) -> dict[str, Any]:
    """The card's YAML, as the Hub and ``datasets`` read it (``license`` is written apart)."""
    yaml_features = [{"name": name, "dtype": "image"} for name in ("image", "label")]
    yaml_features += [{"name": n, "dtype": t} for n, t in (("key", "string"), ("file_name", "string"),
                                                           ("width", "int32"), ("height", "int32"),
                                                           ("confidence", "float64"))]
    names = {str(i): name for i, name in enumerate(run.labelset.names)}
    yaml_features.append({"name": "classes", "sequence": {"class_label": {"names": names}}})
    return {
        "pretty_name": f"{run.labelset.name} (seglabel labels)",
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "size_categories": [size_category(images)],
        "tags": ["seglabel", "pseudo-labels"],
        "configs": [{"config_name": "default", "default": True,
                     "data_files": [{"split": SPLIT, "path": f"{DATA}/{SPLIT}-*"}]}],
        "dataset_info": {"features": yaml_features,
                         "splits": [{"name": SPLIT, "num_bytes": num_bytes, "num_examples": images}],
                         "download_size": download_size, "dataset_size": num_bytes},
    }


def _model_shown(run: RunOutput) -> str:
    """The model spec without the folders of a weight file (they would go to the Hub)."""
    spec = str(run.run.get("model") or "unknown")
    kind, sep, what = spec.partition(":")
    return f"{kind}:{os.path.basename(what)}" if sep and ("/" in what or os.sep in what) else spec


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def card(run: RunOutput, images: int, num_bytes: int = 0, download_size: int = 0) -> str:
    ls = run.labelset
    front = yaml.safe_dump(card_metadata(run, images, num_bytes, download_size), sort_keys=False,
                           allow_unicode=True, width=1000)
    classes = "\n".join(f"| {i} | {_cell(c.name)}{' (written as ignored)' if c.ignore else ''} | "
                        f"{'#%02x%02x%02x' % c.color} |" for i, c in enumerate(ls.classes))
    return f"""---
license: unknown  # the photos' licence (e.g. cc-by-4.0): set it before uploading
{front}---

# {ls.name}: per-pixel labels made by seglabel

{images} photos, each with its label map, written by `seglabel export --format hf` from a
`seglabel annotate` run (model `{_model_shown(run)}`, label set `{ls.name}`, seglabel
{run.run.get("seglabel_version", "unknown")}). The labels were made by a model, not by people.

```python
from datasets import load_dataset

ds = load_dataset("path/to/this/folder", split="{SPLIT}")  # or the Hub repo id
row = ds[0]  # row["image"], row["label"]: PIL images; np.array(row["label"]) = class indices
```

| column | |
|---|---|
| `image` | the photo, its file's bytes as they are (`datasets` applies its EXIF orientation) |
| `label` | the label map: grayscale PNG, pixel = class index, {ls.ignore_index} = ignored |
| `key`, `file_name` | seglabel's key and the photo's path relative to the folder labelled |
| `width`, `height` | the label map's size (the photo's, upright) |
| `confidence` | the image's mean top-class probability (lower = worth a look) |
| `classes` | the classes present (class indices, names in the features) |

`id2label.json` maps pixel values to class names.

| id | class | colour |
|---|---|---|
{classes}
"""


__all__ = ["card", "features", "require_pyarrow", "shard_name", "write_hf"]

"""Label Studio's brush RLE: the rle-pack bit stream its BrushLabels results carry as ``rle``.

Not COCO RLE. The stream encodes a flat array of values (for a brush: the RGBA bytes of a
W x H image, row by row, 0 or 255):

- header: number of values (32 bits), word size - 1 (5 bits), then four run-length field sizes,
  each minus 1 (4 bits each);
- then chunks until every value is covered: 1 bit (1 = one value repeated, 0 = literal values),
  2 bits choosing one of the four field sizes, the run length - 1 in that many bits, then the
  value once (repeated) or each value (literal), ``word size`` bits each;
- the last byte is padded with zero bits. ``rle`` in the JSON is the list of the stream's bytes.

Every run of a brush buffer is at least 4 values long (each pixel is 4 equal bytes), so this
encoder writes repeat chunks only, which the format allows for any run length.
"""
from __future__ import annotations

import numpy as np

from ..errors import SeglabelError

WORD_SIZE = 8
RUN_FIELD_SIZES = (3, 4, 8, 16)  # bits for (run length - 1); the sizes Label Studio itself uses


def brush_buffer(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) mask as Label Studio paints it: RGBA bytes, 255 where the mask is set."""
    return np.repeat(np.where(mask.reshape(-1), 255, 0).astype(np.uint8), 4)


def encode(values: np.ndarray, word_size: int = WORD_SIZE, field_sizes: tuple[int, ...] = RUN_FIELD_SIZES) -> list[int]:
    """rle-pack a flat array of unsigned values below ``2 ** word_size``; returns the bytes."""
    values = np.asarray(values).reshape(-1)
    if values.size >= 2 ** 32:
        raise SeglabelError(f"{values.size} values: the format counts them in 32 bits")
    if values.size and int(values.max()) >= 2 ** word_size:
        raise SeglabelError(f"value {int(values.max())} does not fit in {word_size} bits")
    bits = [f"{values.size:032b}", f"{word_size - 1:05b}"] + [f"{s - 1:04b}" for s in field_sizes]
    longest = 2 ** max(field_sizes)
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = [0, *change.tolist()] if values.size else []
    ends = [*change.tolist(), values.size]
    for start, end in zip(starts, ends):
        word = f"{int(values[start]):0{word_size}b}"
        length = int(end - start)
        while length:
            n = min(length, longest)
            size_index = next(i for i, s in enumerate(field_sizes) if n - 1 < 2 ** s)
            bits.append(f"1{size_index:02b}{n - 1:0{field_sizes[size_index]}b}{word}")
            length -= n
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big")) if stream else []


def encode_mask(mask: np.ndarray) -> list[int]:
    """The ``rle`` of a BrushLabels result for a boolean (H, W) mask."""
    return encode(brush_buffer(mask))

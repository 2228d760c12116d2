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
encoder writes repeat chunks only, which the format allows for any run length. ``decode`` reads
both kinds of chunk (Label Studio's own encoder writes a literal chunk for every run of one), for
``seglabel import``: a pixel is painted when its alpha byte is not 0, as Label Studio's editor
takes it.
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


_DIGITS = bytes.maketrans(bytes([0, 1]), b"01")


class BrushError(SeglabelError, ValueError):
    """A brush RLE that does not decode (truncated, or another length than its image's)."""


def decode(data: list[int] | bytes) -> np.ndarray:
    """The flat array of values an rle-pack stream holds (uint8 for words of at most 8 bits)."""
    try:
        raw = bytes(data)
    except (TypeError, ValueError):
        raise BrushError("the rle is not a list of bytes (0 to 255)") from None
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))
    text = bits.tobytes().translate(_DIGITS).decode("ascii")  # "0101...": int(text[a:b], 2) reads a field
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(text):
            raise BrushError("the rle ends early")
        value = int(text[pos:pos + n], 2) if n else 0
        pos += n
        return value

    count, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    dtype = np.uint8 if word <= 8 else np.uint32
    values, lengths, literals = [], [], []  # repeat chunks; literal blocks kept apart, in order
    done = 0
    while done < count:
        repeat = read(1)
        n = read(sizes[read(2)]) + 1
        n = min(n, count - done)
        if repeat:
            values.append(read(word))
            lengths.append(n)
        else:
            if pos + n * word > len(text):
                raise BrushError("the rle ends early")
            block = bits[pos:pos + n * word].reshape(n, word).astype(np.uint32)
            pos += n * word
            literals.append((len(values), block @ (1 << np.arange(word - 1, -1, -1, dtype=np.uint32))))
            values.append(0)
            lengths.append(0)  # a placeholder where the literal block goes
        done += n
    if not literals:
        return np.repeat(np.asarray(values, dtype=dtype), lengths)
    parts, start = [], 0
    for index, block in literals:
        parts.append(np.repeat(np.asarray(values[start:index], dtype=dtype), lengths[start:index]))
        parts.append(block.astype(dtype))
        start = index + 1
    parts.append(np.repeat(np.asarray(values[start:], dtype=dtype), lengths[start:]))
    return np.concatenate(parts)


def decode_mask(data: list[int] | bytes, width: int, height: int) -> np.ndarray:
    """The boolean (H, W) mask of a BrushLabels result's ``rle``: the pixels whose alpha is not 0."""
    values = decode(data)
    if values.size != width * height * 4:
        raise BrushError(f"the rle holds {values.size} values, not {width}x{height}x4 (its image's RGBA bytes)")
    return values.reshape(height, width, 4)[..., 3] > 0

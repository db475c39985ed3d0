"""Malformed PNG, JPEG, TIFF and BMP files, and files whose suffix medseg does not read."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tests.corpus.base import Case


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes = b"", colour: int = 2) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims ``width`` x ``height`` 8-bit pixels over ``idat``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat or zlib.compress(bytes(64))) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _image_bytes(fmt: str, array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _tiff_bytes(array: np.ndarray, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def raster_cases(root: Path) -> list[Case]:
    folder = root / "raster"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (24, 32), dtype=np.uint8)
    cases: list[Case] = []

    def add(name: str, payload: bytes, **kw: object) -> Path:
        path = folder / name
        path.write_bytes(payload)
        cases.append(Case(f"raster/{name}", path, **kw))  # type: ignore[arg-type]
        return path

    png, jpeg, bmp = _image_bytes("PNG", rgb), _image_bytes("JPEG", rgb), _image_bytes("BMP", grey)
    tiff = _tiff_bytes(rng.normal(size=(24, 32)).astype(np.float32))
    add("valid.png", png, valid=True)
    add("valid.jpg", jpeg, valid=True)
    add("valid.bmp", bmp, valid=True)
    add("valid.tif", tiff, valid=True)
    # PNG
    add("png-truncated.png", png[: len(png) // 2], header_refuses=False)
    add("png-wrong-magic.png", b"\x89PNX\r\n\x1a\n" + png[8:])
    add("png-random-bytes.png", rng.bytes(2048))
    add("png-empty.png", b"")
    add("png-zero-width.png", png_claiming(0, 24))
    add("png-huge-claim.png", png_claiming(100_000, 100_000))
    add("png-bomb-claim.png", png_claiming(20_000, 20_000))
    add("png-size-lie.png", png_claiming(3000, 3000), header_refuses=False)
    add("png-bad-idat.png", png_claiming(32, 24, idat=b"not zlib at all"), header_refuses=False)
    corrupt = bytearray(png)
    corrupt[40:48] = b"\x00" * 8
    add("png-bad-crc.png", bytes(corrupt), header_refuses=False)
    add("png-only-signature.png", b"\x89PNG\r\n\x1a\n")
    # JPEG
    add("jpeg-truncated.jpg", jpeg[: len(jpeg) // 2], header_refuses=False)
    add("jpeg-wrong-magic.jpg", b"\x00\x00" + jpeg[2:])
    add("jpeg-empty.jpeg", b"")
    sof = jpeg.find(b"\xff\xc0")
    huge = bytearray(jpeg)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    add("jpeg-huge-claim.jpg", bytes(huge))
    small = bytearray(jpeg)
    small[sof + 5 : sof + 9] = struct.pack(">HH", 4000, 4000)
    add("jpeg-size-lie.jpg", bytes(small))
    # TIFF
    add("tiff-truncated.tif", tiff[: len(tiff) - 1500])
    add("tiff-wrong-magic.tif", b"MX\x2a\x00" + tiff[4:])
    add("tiff-empty.tiff", b"")
    nan = rng.normal(size=(24, 32)).astype(np.float32)
    nan[3, 4] = np.nan
    add("tiff-float-nan.tif", _tiff_bytes(nan), header_refuses=False)
    inf = rng.normal(size=(24, 32)).astype(np.float32)
    inf[0, 0] = np.inf
    add("tiff-float-inf.tiff", _tiff_bytes(inf), header_refuses=False)
    add("tiff-multi-page.tif", _tiff_bytes(rng.normal(size=(3, 24, 32)).astype(np.float32), photometric="minisblack"))
    deflated = _tiff_bytes(rng.normal(size=(64, 64)).astype(np.float32), compression="zlib")
    add("tiff-deflate-truncated.tif", deflated[: len(deflated) // 2])
    with tifffile.TiffFile(io.BytesIO(tiff)) as tif:
        page = tif.pages[0]
        width_tag, offsets_tag = page.tags["ImageWidth"], page.tags["StripOffsets"]
        width_at, offsets_at = width_tag.valueoffset, offsets_tag.valueoffset
        width_type = width_tag.dtype
    wide = bytearray(tiff)
    fmt = "<H" if width_type == 3 else "<I"
    wide[width_at : width_at + struct.calcsize(fmt)] = struct.pack(fmt, 60000)
    add("tiff-width-lie.tif", bytes(wide))
    zero = bytearray(tiff)
    zero[width_at : width_at + struct.calcsize(fmt)] = struct.pack(fmt, 0)
    add("tiff-zero-width.tif", bytes(zero))
    past = bytearray(tiff)
    past[offsets_at : offsets_at + 4] = struct.pack("<I", 10_000_000)
    add("tiff-strip-past-eof.tif", bytes(past))
    # BMP
    add("bmp-truncated.bmp", bmp[: len(bmp) // 2], header_refuses=False)
    big_bmp = bytearray(bmp)
    big_bmp[18:26] = struct.pack("<ii", 60000, 60000)
    add("bmp-huge-claim.bmp", bytes(big_bmp))
    add("bmp-empty.bmp", b"")
    # suffixes medseg does not read
    add("unknown.xyz", png)
    add("no-suffix", png)
    add("image.nii.exe", png)
    add("image.txt", b"hello")
    return cases


BUILDERS: tuple[Callable[[Path], list[Case]], ...] = (raster_cases,)

"""Image encoders: uint8 HxWx3 arrays -> deterministic file bytes, one explicit name table.

Every encoder here is deterministic for a given array and settings (PIL's zlib, libjpeg and libwebp
with fixed parameters), which is what makes a re-run shard byte-identical
(docs/design.md invariant 2).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np


def _encode_png(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _encode_jpg(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def _encode_webp(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


#: output.format -> encoder(array, quality) -> bytes. The name is also the tar member extension.
ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "png": _encode_png,
    "jpg": _encode_jpg,
    "webp": _encode_webp,
}

#: The tar member extension of a sample's final latents (``output.save_latents``): a float16 ``.npy`` array,
#: channels x height/8 x width/8, in the space the UNet denoises (what ``output_type="latent"`` returns).
LATENTS = "latents.npy"

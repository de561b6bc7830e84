"""Baselines a model's figures are read against: general-purpose compressors on the same bytes.

A language model's held-out bits per byte means something only beside what gzip, bz2 and xz reach on
exactly the text it scored. This module does not score models.
"""

import bz2
import gzip
import lzma


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9 (preset 9) on `data`."""
    n = max(1, len(data))
    return {
        "gzip_bpb": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / n,
        "bz2_bpb": 8 * len(bz2.compress(data, compresslevel=9)) / n,
        "xz_bpb": 8 * len(lzma.compress(data, preset=9)) / n,
    }

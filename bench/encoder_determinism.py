"""Whether an encoder gives the same bits every time it encodes the same frames, as a2n's video path sets it up.

A resumed or shared clip (a2n.video) equals an uninterrupted run only if the encoder is deterministic.
This encodes the same frames (a moving pattern, 96x72, 6 frames, 24 fps) many times in one process
with the settings a2n uses (libx264 crf 18 preset medium by default) and counts the distinct outputs,
with a busy thread beside it as the model would be. On Linux it repeats libx264 with its AVX-512
routines masked off (x264's `asm` option with the CPU's other features), to show where the
difference comes from. Prints a Markdown table: runs, distinct outputs, and PSNR to the source.

    python bench/encoder_determinism.py [--runs 100] [--codecs libx264 ffv1]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import platform
import threading
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from a2n.video import QUALITY, _conversion

FPS, W, H = 24, 96, 72
TIME_BASE = Fraction(1, 12288)
# x264's names for the CPU features it uses, and the /proc/cpuinfo flags that stand for them
X264_FEATURES = {"MMX2": "mmxext", "SSE": "sse", "SSE2": "sse2", "SSE2Fast": "sse2", "SSE3": "pni", "SSSE3": "ssse3",
                 "SSE4.1": "sse4_1", "SSE4.2": "sse4_2", "LZCNT": "abm", "AVX": "avx", "FMA3": "fma", "BMI1": "bmi1",
                 "BMI2": "bmi2", "AVX2": "avx2", "Cache64": "sse2"}


def pattern(i: int) -> np.ndarray:
    """Frame i of a moving pattern."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([(x * 3 + i * 20) % 256, (y * 3 + i * 10) % 256, (x + y + i * 5) % 256], -1).astype(np.uint8)


def encode(frames: list[np.ndarray], codec: str, options: dict[str, str]) -> tuple[str, float]:
    """Encode frames into an in-memory mp4 as a2n's segments are made; returns (digest of the packets, PSNR to the source)."""
    buf, digest = io.BytesIO(), hashlib.sha1()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base, stream.codec_context.framerate = TIME_BASE, Fraction(FPS)
        stream.codec_context.options = options
        for i, rgb in enumerate(frames + [None]):
            frame = None
            if rgb is not None:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    format=stream.pix_fmt, dst_colorspace="itu709", dst_color_range="MPEG", interpolation=_conversion(False))
                frame.pts, frame.duration, frame.time_base = i * 512, 512, TIME_BASE
            for packet in stream.encode(frame):
                digest.update(bytes(packet))
                out.mux(packet)
    buf.seek(0)
    with av.open(buf) as decoded:
        back = np.stack([f.to_ndarray(format="rgb24", interpolation=_conversion(False)) for f in decoded.decode(video=0)])
    mse = np.mean((back.astype(np.float64) - np.stack(frames)) ** 2)
    return digest.hexdigest()[:12], 10 * np.log10(255**2 / mse)


def without_avx512() -> str | None:
    """x264's asm option naming this CPU's features but AVX-512 (Linux), or None where they cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    return ",".join(name for name, flag in X264_FEATURES.items() if flag in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--codecs", nargs="+", default=["libx264", "ffv1"])
    args = ap.parse_args()
    frames = [pattern(i) for i in range(6)]
    busy = threading.Event()

    def burn() -> None:
        a = np.random.default_rng(0).random((300, 300))
        while not busy.is_set():
            a @ a

    rows = []
    for codec in args.codecs:
        crf, preset = QUALITY.get(codec, (None, None))
        options = {k: v for k, v in (("crf", crf), ("preset", preset)) if v is not None}
        cases = [(codec, "detected (default)", options)]
        masked = without_avx512() if codec == "libx264" else None
        if masked:
            cases.append((codec, "AVX-512 masked off", {**options, "x264-params": f"asm={masked}"}))
        rows += cases
    burner = threading.Thread(target=burn)
    burner.start()
    try:
        print(f"{platform.processor() or platform.machine()}, PyAV {av.__version__}, {args.runs} encodes per row, one busy thread beside\n")
        print("| codec | CPU features | distinct outputs | most common | PSNR to source (dB) |")
        print("|---|---|---|---|---|")
        for codec, asm, options in rows:
            results = [encode(frames, codec, options) for _ in range(args.runs)]
            counts = Counter(digest for digest, _ in results)
            psnr = [p for _, p in results]
            print(f"| {codec} | {asm} | {len(counts)} | {counts.most_common(1)[0][1]} of {args.runs} | {min(psnr):.2f} .. {max(psnr):.2f} |")
    finally:
        busy.set()
        burner.join()


if __name__ == "__main__":
    main()

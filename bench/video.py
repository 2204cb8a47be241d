"""Video throughput of `a2n upscale clip.mp4` against the same frames as images through the folder path, and flicker.

Throughput: a clip of a pan across the shipped sample (with a sine tone) is upscaled by
a2n.video.upscale_video, and its frames, saved as PNG beforehand (not timed), by a2n.batch.run
as `a2n upscale FOLDER` does; for each scale and backend, in one run. Prints frames/s and the
ratio as a Markdown table (target: the video path within 10% of the image rate).

Flicker (--flicker): a still scene with sensor-like noise, each frame upscaled on its own. Prints
the mean absolute difference between consecutive output frames against the same for bicubic,
and how far each block's attention-dropout weight (pi_attn, from the frame's global mean) moves
from frame to frame.

    python bench/video.py [--frames 48] [--size 640x360] [--scales 2 4] [--backends torch openvino]
    python bench/video.py --flicker [--frames 24] [--size 640x360] [--noise 2] [--scales 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import tempfile
import time
from fractions import Fraction
from functools import partial
from importlib import resources
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from a2n import analysis, batch
from a2n.inference import load_model, upscale_array, upscale_picture
from a2n.video import upscale_video

SAMPLE = Path(str(resources.files("a2n"))) / "samples" / "village.png"
FPS = 24


def pan(n: int, width: int, height: int) -> list[np.ndarray]:
    """n frames of a slow pan across the shipped sample, width x height."""
    sample = Image.open(SAMPLE).convert("RGB")
    crop_w, crop_h = 2 * sample.width // 3, 2 * sample.height // 3
    frames = []
    for i in range(n):
        left = round(i * (sample.width - crop_w) / max(n - 1, 1))
        crop = sample.crop((left, 0, left + crop_w, crop_h)).resize((width, height), Image.Resampling.BICUBIC)
        frames.append(np.asarray(crop))
    return frames


def write_clip(path: Path, frames: list[np.ndarray]) -> None:
    """An mp4 of the frames (libx264, BT.709 limited range) with a 440 Hz tone as long as the picture."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt, video.codec_context.colorspace, video.codec_context.color_range = "yuv420p", 1, 1
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "mono"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p", dst_colorspace="itu709",
                                                                              dst_color_range="MPEG")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        samples = 48000 * len(frames) // FPS
        for start in range(0, samples, 1024):
            t = np.arange(start, min(start + 1024, samples)) / 48000
            tone = av.AudioFrame.from_ndarray((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None], format="s16", layout="mono")
            tone.sample_rate, tone.pts = 48000, start
            out.mux(sound.encode(tone))
        out.mux(sound.encode(None))


def decoded_frames(path: Path) -> list[np.ndarray]:
    """The clip's frames as RGB, as the video path decodes them."""
    with av.open(str(path)) as clip:
        return [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]


def installed_backends() -> list[str]:
    """torch, plus onnxruntime and openvino where installed."""
    return ["torch"] + [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b)]


def throughput(args: argparse.Namespace, width: int, height: int) -> None:
    """Frames per second of the video path and of the folder path, per scale and backend, as a Markdown table."""
    extra = {"precision": args.precision} if args.precision else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, pan(args.frames, width, height))
        folder = Path(tmp) / "frames"
        folder.mkdir()
        for i, rgb in enumerate(decoded_frames(clip)):
            Image.fromarray(rgb).save(folder / f"f{i:05d}.png")
        for scale in args.scales:
            model = load_model(scale)
            for backend in args.backends:
                upscale_array(model, np.asarray(Image.open(folder / "f00000.png")), backend=backend, **extra)  # warm-up
                start = time.perf_counter()
                upscale_video(clip, Path(tmp) / f"out_{scale}_{backend}.mp4", model, backend=backend, progress=False, **extra)
                video_s = time.perf_counter() - start
                plan = batch.make_plan([str(folder)], str(Path(tmp) / f"png_{scale}_{backend}"), scale)
                start = time.perf_counter()
                batch.run(plan, partial(upscale_picture, model, backend=backend, **extra))
                image_s = time.perf_counter() - start
                rows.append((scale, backend, args.frames / video_s, args.frames / image_s))
    print(f"\n{args.frames} frames {width}x{height}, precision {args.precision or 'default'}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, PyAV {av.__version__}\n")
    print("| scale | backend | video frames/s | folder images/s | video / images |")
    print("|---|---|---|---|---|")
    for scale, backend, video_fps, image_fps in rows:
        print(f"| x{scale} | {backend} | {video_fps:.2f} | {image_fps:.2f} | {video_fps / image_fps:.2f} |")


def flicker(args: argparse.Namespace, width: int, height: int) -> None:
    """Frame-to-frame change of a still noisy scene: A2N against bicubic, and the movement of every block's pi_attn."""
    rng = np.random.default_rng(0)
    still = pan(1, width, height)[0].astype(np.float32)
    frames = [np.clip(np.round(still + rng.normal(0, args.noise, still.shape)), 0, 255).astype(np.uint8) for _ in range(args.frames)]
    extra = {"precision": args.precision} if args.precision else {}
    print(f"\n{args.frames} frames of a still {width}x{height} scene with Gaussian noise of sigma {args.noise} levels, "
          f"backend {args.backends[0]}\n")
    print("| scale | output | mean abs diff of consecutive frames | vs bicubic |")
    print("|---|---|---|---|")
    for scale in args.scales:
        model = load_model(scale)
        outputs = [upscale_array(model, f, backend=args.backends[0], **extra).astype(np.float32) for f in frames]
        bicubic = [np.asarray(Image.fromarray(f).resize((width * scale, height * scale), Image.Resampling.BICUBIC), np.float32) for f in frames]
        a2n_mad, bicubic_mad = mean_abs_change(outputs), mean_abs_change(bicubic)
        print(f"| x{scale} | A2N | {a2n_mad:.3f} | {a2n_mad / bicubic_mad:.2f}x |")
        print(f"| x{scale} | bicubic | {bicubic_mad:.3f} | 1.00x |")
        pi = np.array(analysis.branch_weights(model, [(f"frame{i}", None, f) for i, f in enumerate(frames)])["pi_attn"])
        jumps = np.abs(np.diff(pi, axis=0))
        print(f"\nx{scale} pi_attn (frames x {pi.shape[1]} blocks): largest frame-to-frame change {jumps.max():.5f} "
              f"(block {int(jumps.max(axis=0).argmax()) + 1}), mean change {jumps.mean():.5f}, "
              f"largest spread over frames {pi.std(axis=0).max():.5f}; range {pi.min():.3f} .. {pi.max():.3f}\n")


def mean_abs_change(frames: list[np.ndarray]) -> float:
    """Mean absolute difference between consecutive frames, in 8-bit levels."""
    return float(np.mean([np.abs(b - a).mean() for a, b in zip(frames, frames[1:])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", default="640x360", help="input WIDTHxHEIGHT")
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4], choices=(2, 3, 4))
    ap.add_argument("--backends", nargs="+", default=None, help="default: torch and every installed runtime (flicker: the first)")
    ap.add_argument("--precision", help="default: the library's default")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--flicker", action="store_true", help="measure flicker on a still noisy scene instead of throughput")
    ap.add_argument("--noise", type=float, default=2.0, help="flicker: noise sigma in 8-bit levels (default 2)")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    args.backends = args.backends or installed_backends()
    if args.threads:
        torch.set_num_threads(args.threads)
    (flicker if args.flicker else throughput)(args, width, height)


if __name__ == "__main__":
    main()

"""The files side of `a2n upscale`: inputs to jobs, output names, and one failure never stopping the rest.

Rules: an output never replaces its own input, nothing existing is replaced without overwrite,
two inputs never write the same output, and a file that is another input's output is not upscaled
again. Every image is tried; the failures are listed at the end.
"""

from __future__ import annotations

from a2n import A2NError

import glob
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from a2n import io

FORMAT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tiff", "bmp": ".bmp"}
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mkv", ".mov", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv", ".3gp", ".nut")


class BatchError(A2NError):
    """Inputs or an output that make the whole command impossible, or images that failed."""


@dataclass
class Plan:
    """What to do: (source, target) jobs, and inputs already settled as skipped or failed."""

    jobs: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def find_inputs(inputs: Sequence[str], recursive: bool = False) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """Image files named by files, folders and glob patterns, each with the folder it was found in.

    Returns (file, folder or None) pairs in the order given, without repeats, and the inputs
    that matched nothing with the reason.
    """
    found: list[tuple[Path, Path | None]] = []
    failed: list[tuple[str, str]] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            files = [(f, path) for f in sorted(io.list_images(path, recursive) + list_videos(path, recursive))]
            if not files:
                failed.append((arg, "no images or videos in this folder (PNG, JPEG, WebP, TIFF, BMP; MP4, MKV, MOV, WebM, AVI, ...)"
                               + ("" if recursive else "; pass --recursive for subfolders")))
        elif path.is_file():
            files = [(path, None)]
        elif any(c in arg for c in "*?["):
            files = [(Path(m), None) for m in sorted(glob.glob(arg, recursive=recursive))
                     if Path(m).is_file() and Path(m).suffix.lower() in io.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]
            if not files:
                failed.append((arg, "no image files match this pattern"))
        else:
            files = []
            failed.append((arg, "no such file or folder"))
        found += files
    seen: set[Path] = set()
    unique = []
    for f, root in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, root))
    return unique, failed


def is_video(path: Path) -> bool:
    """Whether a file name has a video extension (upscaled by a2n.video)."""
    return path.suffix.lower() in VIDEO_EXTENSIONS


def list_videos(folder: Path, recursive: bool = False) -> list[Path]:
    """Video files inside a folder (and its subfolders when recursive)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return [p for p in found if p.is_file() and is_video(p)]


def make_plan(
    inputs: Sequence[str],
    out: str | None,
    scale: int,
    fmt: str | None = None,
    suffix: str | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    skip_existing: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> Plan:
    """Match every input image with its output path, applying the no-replace rules.

    The output is <name><suffix>.<ext> (suffix default _x<scale>) next to the input, or inside
    the folder out (mirroring subfolders of a folder input); out is a file when it has an image
    extension and there is one image. ext comes from fmt, else from the input.
    shard=(rank, world) keeps every world-th input from rank on: the split depends only on the
    inputs, never on which outputs exist yet, so processes started together each do their own share.
    """
    rank, world = shard
    suffix = f"_x{scale}" if suffix is None else suffix
    found, failed = find_inputs(inputs, recursive)
    result = Plan(failed=failed if rank == 0 else [])
    out_path = Path(out) if out else None
    out_is_file = out_path is not None and out_path.suffix.lower() in io.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS and not out_path.is_dir()
    if out_is_file and len(found) + len(failed) > 1:
        raise BatchError(f"{out}: names one file but {len(found) + len(failed)} inputs were given; pass a folder to -o")
    if out_is_file and fmt and not is_video(out_path) and io.output_format(out_path) != io.FORMATS[FORMAT_EXTENSIONS[fmt]]:
        raise BatchError(f"{out}: the extension does not match --format {fmt}; change one of them")
    targets: dict[Path, Path] = {}
    for source, root in found:
        ext = source.suffix if is_video(source) else FORMAT_EXTENSIONS[fmt] if fmt else source.suffix if source.suffix.lower() in io.IMAGE_EXTENSIONS else ".png"
        name = f"{source.stem}{suffix}{ext}"
        if out_path is None:
            target = source.with_name(name)
        elif out_is_file:
            target = out_path
        else:
            target = out_path / (source.parent.relative_to(root) if root else Path()) / name
        targets[source] = target
    outputs = {t.resolve(): s for s, t in targets.items()}
    claimed: dict[Path, Path] = {}
    for i, (source, target) in enumerate(targets.items()):
        key, mine = target.resolve(), i % world == rank or is_video(source)  # every process takes part in every clip
        if source.resolve() in outputs and outputs[source.resolve()] != source:
            reason = ("skipped", f"it is the output of {outputs[source.resolve()]} in this run")
        elif key == source.resolve():
            reason = ("failed", "the output would replace the input; pass -o FOLDER or a non-empty --suffix")
        elif key in claimed:
            reason = ("failed", f"{target} is also the output of {claimed[key]}; rename one of them or use -o")
        else:
            claimed[key] = source
            if not mine:
                continue
            if target.exists() and skip_existing:
                reason = ("skipped", f"{target} already exists (--skip-existing)")
            elif target.exists() and not overwrite:
                reason = ("failed", f"{target} already exists; pass --overwrite to replace it or --skip-existing to keep it")
            else:
                result.jobs.append((source, target))
                continue
        if mine:
            getattr(result, reason[0]).append((str(source), reason[1]))
    return result


def run(plan: Plan, upscale: Callable[[io.Picture], io.Picture] | None, fmt: str | None = None, quality: int = 95,
        upscaled: int = 0) -> None:
    """Upscale every job with upscale, reporting each output; raise BatchError listing the failures at the end.

    upscale may be None only when the plan has no jobs (for example a2n.inference.upscale_picture
    with the model bound, or a2n.backends.express_upscaler). upscaled counts outputs the caller
    already wrote (clips), for the summary.
    """
    failed = list(plan.failed)
    done = upscaled
    pil_format = io.FORMATS[FORMAT_EXTENSIONS[fmt]] if fmt else None
    bar = tqdm(total=len(plan.jobs), unit="image", disable=None if len(plan.jobs) > 1 else True)

    def settle(source: Path, target: Path, work: Future) -> None:
        nonlocal done
        try:
            work.result()
            tqdm.write(f"{source} -> {target}\n", end="")  # one write: torchrun's processes share the stream
            done += 1
        except A2NError as exc:
            failed.append((str(source), str(exc)))
        except MemoryError:
            failed.append((str(source), "out of memory; pass a smaller --max-memory or --tile"))
        bar.update()

    # Three images in flight: the next one decoding, this one on the model, the last one encoding.
    # Decoders, encoders and torch all release the GIL, so the threads overlap for real.
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        reads = [reader.submit(io.read_image, source) for source, _ in plan.jobs[:1]]
        last_write = None
        for i, (source, target) in enumerate(plan.jobs):
            if i + 1 < len(plan.jobs):
                reads.append(reader.submit(io.read_image, plan.jobs[i + 1][0]))
            try:
                picture = upscale(reads[i].result())
                write = writer.submit(io.write_image, target, picture, pil_format, quality)
            except (A2NError, MemoryError) as exc:
                write = Future()
                write.set_exception(exc)
            reads[i] = None  # the decoded input is no longer needed
            if last_write is not None:
                settle(*last_write)
            last_write = (source, target, write)
        if last_write is not None:
            settle(*last_write)
    bar.close()
    for source, reason in plan.skipped:
        tqdm.write(f"skipped {source}: {reason}\n", end="")
    if failed:
        lines = [f"  {reason}" if reason.startswith(source) else f"  {source}: {reason}" for source, reason in failed]
        raise BatchError(
            f"{len(failed)} failed, {done} upscaled, {len(plan.skipped)} skipped:\n" + "\n".join(lines)
        )
    print(f"{done} upscaled, {len(plan.skipped)} skipped")

"""Video in, video out: every frame through the image path (a2n.inference.upscale_array); sound, subtitles,
timing and colour kept.

How a clip goes through (PyAV, whose wheels bundle FFmpeg's libraries):
- Decode: each frame to RGB with the source's own matrix and range (rgb24, or rgb48le for sources of more
  than 8 bits), one frame ahead of the model in a thread.
- Upscale: upscale_array with the image options (backend, precision, tile, max_memory).
- Encode: back to YUV with the same matrix and range in a second thread, with the source's pts, so a
  variable frame rate is kept; the stream is tagged with the source's matrix, range, primaries and
  transfer. Deep sources come out 10-bit where the codec has a 10-bit format.
- Segments: the clip is cut by time (segment_seconds of source time each) into segment files in a
  hidden work folder next to the output (.<name>.a2n-work). A segment counts as finished once its
  manifest is written, so an interrupted run continues with --resume from the first unfinished one,
  and processes of torchrun (RANK, WORLD_SIZE) take every WORLD_SIZE-th segment of the same clip.
  The result equals an uninterrupted run's bit for bit where the encoder is deterministic (libx264's
  AVX-512 routines are not: README, Video).
- Join: the segments' packets are concatenated without re-encoding, interleaved with the source's
  audio and subtitle packets copied as they are (audio the output container cannot hold is
  transcoded, subtitles it cannot hold are dropped, each with a one-line note); the result is
  written as <work>/joined.<ext> and renamed onto the output, so no output is ever half-written.

Odd sizes: a 4:2:0 output needs even sides, so an output frame with an odd side loses its last column
and/or row (the right and bottom edge), every time; formats without subsampling keep every pixel.
Truncated files: what can be decoded is upscaled; packets that fail to decode are skipped, and a
warning says where decoding stopped or that the frames end before the duration the file declares.
AVI keeps no presentation times: an AVI output gets no B-frames and one tick per frame.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from a2n import A2NError

try:
    import av
except ImportError:  # the video extra is not installed
    av = None

if TYPE_CHECKING:
    from a2n.model import A2N

DEFAULT_CODEC = "libx264"
SEGMENT_SECONDS = 10.0
QUALITY = {"libx264": ("18", "medium"), "libx265": ("20", "medium"), "libvpx-vp9": ("24", None), "libsvtav1": ("26", "6")}
AUDIO_FALLBACKS = ("aac", "libopus", "mp3", "ac3", "flac")
SEGMENT_FORMATS = ("mp4", "mov", "matroska")  # mp4 and mov keep every source time base exactly
ANNEXB_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}  # for containers that want start codes
ANNEXB_FORMATS = ("avi",)  # mpegts inserts the filter itself; AVI also gets no B-frames
SWS_MATRIX = {1: "itu709", 4: "fcc", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
RANGE_NAMES = {1: "MPEG", 2: "JPEG"}
POLL_SECONDS = 2.0


class VideoError(A2NError):
    """A clip that cannot be read or written, or options that do not fit it; the message names the file."""


@dataclass
class Clip:
    """What a clip's first frame and header say: everything the encoder is set up from."""

    path: str
    stream: int
    time_base: Fraction
    rate: Fraction
    first_pts: int
    width: int
    height: int
    pix_fmt: str
    deep: bool
    colorspace: int
    color_range: int
    color_primaries: int
    color_trc: int
    rotation: int
    sample_aspect_ratio: Fraction | None
    frames: int
    duration: float | None


@dataclass
class Encoding:
    """How segments are encoded: codec, its options, pixel format, output size and segment container."""

    codec: str
    options: dict[str, str]
    pix_fmt: str
    width: int
    height: int
    colorspace: int
    color_range: int
    segment_format: str
    segment_seconds: float


@dataclass
class Frame:
    """One decoded frame: its source timestamp and duration (stream time base) and its RGB pixels."""

    pts: int
    duration: int
    rgb: np.ndarray


def upscale_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model: A2N,
    *,
    backend: str | None = None,
    precision: str | None = None,
    tile: int | None = None,
    max_memory: float | None = None,
    codec: str | None = None,
    crf: int | None = None,
    preset: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool | None = None,
    segment_seconds: float = SEGMENT_SECONDS,
    shard: tuple[int, int] = (0, 1),
) -> Path | None:
    """Upscale the clip src into dst (container from dst's extension) with model; returns dst, or None on ranks > 0.

    backend, precision, tile and max_memory as for images (None: upscale_array's defaults). codec
    defaults to libx264 (or the container's own, e.g. VP9 for .webm); crf and preset default per codec
    (QUALITY). resume continues the work folder of an interrupted run; shard=(rank, world) splits the
    clip's segments over processes started together, and rank 0 waits for the others and joins.
    progress=None shows a bar in frames only on a terminal.
    """
    _require_av()
    src, dst = Path(src), Path(dst)
    rank, world = shard
    if segment_seconds <= 0:
        raise VideoError(f"segment_seconds must be positive, got {segment_seconds}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise VideoError(f"{dst}: the output would replace the input; choose another output name")
    if dst.exists() and not overwrite:
        raise VideoError(f"{dst}: already exists; pass --overwrite to replace it")
    clip = probe(src)
    out_format, encoding = _plan_encoding(clip, dst, model.scale, codec, crf, preset, segment_seconds)
    work = dst.with_name(f".{dst.name}.a2n-work")
    _prepare_work(work, _fingerprint(clip, encoding, model, backend, precision), resume or world > 1)
    options = {k: v for k, v in {"backend": backend, "precision": precision}.items() if v is not None}

    def upscale(rgb: np.ndarray) -> np.ndarray:
        from a2n.inference import upscale_array

        return upscale_array(model, rgb, tile, max_memory, False, **options)

    done = _finished(work)
    bar = tqdm(total=max(clip.frames // world, 1) if clip.frames else None, initial=sum(m["frames"] for m in done.values()) if world == 1 else 0,
               unit="frame", desc=src.name, disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        _encode_segments(clip, encoding, work, upscale, shard, bar)
    except BaseException:
        bar.close()
        _note(f"{src}: the finished segments stay in {work}; run the same command with --resume to continue")
        raise
    bar.close()
    if rank != 0:
        return None
    last = _wait_for_segments(work)
    _join(clip, work, last, dst, out_format)
    return dst


def probe(path: Path) -> Clip:
    """Open a clip and decode its first frame; a VideoError names the file when it is not a usable video."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        first = next(_decoded(container, stream, path), None)
        if first is None:
            raise VideoError(f"{path}: no frame of its video stream could be decoded; the file is damaged or cut short")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
        duration = _declared_duration(container, stream)
        frames = stream.frames or (round(duration * rate) if duration else 0)
        return Clip(
            str(path), stream.index, stream.time_base, rate, first.pts or 0, first.width, first.height,
            first.format.name, first.format.components[0].bits > 8, int(first.colorspace), int(first.color_range),
            int(first.color_primaries), int(first.color_trc), int(first.rotation or 0),
            stream.sample_aspect_ratio, int(frames), float(duration) if duration else None,
        )


def _declared_duration(container: Any, stream: Any) -> Fraction | None:
    """How long the video stream says it lasts: its own duration, Matroska's DURATION tag, or the file's."""
    if stream.duration:
        return stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION", "")
    if tag.count(":") == 2:
        hours, minutes, seconds = tag.split(":")
        return Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    return Fraction(container.duration, 1_000_000) if container.duration else None


def _require_av() -> None:
    """Raise a VideoError telling how to install PyAV when it is missing."""
    if av is None:
        raise VideoError("video needs PyAV, which is not installed: pip install 'a2n[video]'")


def _note(message: str) -> None:
    """A one-line note or warning for the user, on stderr, without breaking a progress bar."""
    tqdm.write(message, file=sys.stderr)


def _open(path: Path) -> Any:
    """Open a clip for reading; every failure becomes a VideoError naming the file."""
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty (0 bytes)")
    try:
        return av.open(str(path), metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: not a video FFmpeg can read, or cut short before its index ({exc.strerror})") from exc


def _video_stream(container: Any, path: Path) -> Any:
    """The clip's first video stream that is not cover art, with a decoder in this FFmpeg build."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise VideoError(f"{path}: has no video stream ({', '.join(kinds)} only); give a video file")
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoError(f"{path}: its video codec cannot be decoded by this FFmpeg build (PyAV {av.__version__})")
    stream.thread_type = "AUTO"
    return stream


def _decoded(container: Any, stream: Any, path: Path) -> Iterator[Any]:
    """The stream's decoded frames; packets that fail to decode are skipped and a read error ends the clip, with a warning."""
    failed, last_time = 0, None
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as exc:
            _note(f"warning: {path}: reading stopped after {last_time or 0:.3f} s ({exc.strerror}); the output ends there")
            break
        try:
            frames = stream.decode(packet)
        except av.error.InvalidDataError:
            failed += 1
            continue
        for frame in frames:
            last_time = frame.time if frame.time is not None else last_time
            yield frame
    if failed:
        _note(f"warning: {path}: {failed} damaged packet(s) could not be decoded and were skipped")


def _to_frame(frame: Any, deep: bool, previous: Frame | None, default_duration: int) -> Frame:
    """A decoded frame as RGB with the source's matrix and range, and its pts (made up only where the file has none)."""
    rgb = frame.to_ndarray(format="rgb48le" if deep else "rgb24", interpolation=_conversion(deep))
    duration = frame.duration or default_duration
    pts = frame.pts if frame.pts is not None else (previous.pts + previous.duration if previous else 0)
    return Frame(pts, duration, rgb)


def _conversion(deep: bool) -> Any:
    """swscale flags for YUV <-> RGB: exact rounding, and full chroma resolution for 8 bits (with 16-bit RGB
    swscale's full-chroma input path shifts colours, so deep frames leave it out)."""
    flags = av.video.reformatter.Interpolation
    exact = flags.BILINEAR | flags.ACCURATE_RND
    return exact if deep else exact | flags.FULL_CHR_H_INT | flags.FULL_CHR_H_INP


def _frames(clip: Clip, start: int, seek: bool) -> Iterator[Frame]:
    """The clip's frames from pts start on; seeks to the keyframe before start, or decodes from the beginning
    when seeking lands after it."""
    path = Path(clip.path)
    default_duration = max(1, round(1 / (clip.rate * clip.time_base)))
    with _open(path) as container:
        stream = _video_stream(container, path)
        if seek:
            container.seek(start, stream=stream)
        previous, repeated = None, 0
        for i, decoded in enumerate(_decoded(container, stream, path)):
            if seek and i == 0 and decoded.pts is not None and decoded.pts > start:
                yield from _frames(clip, start, seek=False)
                return
            if decoded.width != clip.width or decoded.height != clip.height:
                raise VideoError(f"{path}: the frame size changes from {clip.width}x{clip.height} to {decoded.width}x"
                                 f"{decoded.height} at {decoded.time or 0:.3f} s; a2n upscales clips of one frame size")
            if previous is not None and decoded.pts is not None and decoded.pts <= previous.pts:
                repeated += 1
                continue
            frame = _to_frame(decoded, clip.deep, previous, default_duration)
            previous = frame
            if frame.pts >= start:
                yield frame
        if repeated:
            _note(f"warning: {path}: {repeated} frame(s) with a repeated or backward timestamp were left out")


def _plan_encoding(clip: Clip, dst: Path, scale: int, codec: str | None, crf: int | None, preset: str | None,
                   segment_seconds: float) -> tuple[str, Encoding]:
    """Check the output container, codec and options against each other before any work; returns the container name and Encoding."""
    out_format, default_codec = _container_info(dst)
    name = codec or (DEFAULT_CODEC if _holds(out_format, DEFAULT_CODEC) else default_codec)
    try:
        encoder = av.codec.Codec(name, "w")
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError(f"unknown video codec {name!r} in this FFmpeg build; try libx264, libx265, libvpx-vp9, libsvtav1 or ffv1") from exc
    if encoder.type != "video":
        raise VideoError(f"{name!r} is not a video codec ({encoder.type}); --codec takes a video codec such as libx264")
    if not _holds(out_format, encoder.name):
        raise VideoError(f"{dst}: the {out_format} container cannot hold {encoder.name} video; use another --codec or an .mkv output")
    private = {o.name for o in av.CodecContext.create(encoder.name, "w").supported_options.private}
    default_crf, default_preset = QUALITY.get(encoder.name, (None, None))
    options = {}
    if crf is not None and "crf" not in private:
        raise VideoError(f"--crf does not apply to {encoder.name}; leave it out (or pick a codec with a quality setting, such as libx264)")
    if preset is not None and "preset" not in private:
        raise VideoError(f"--preset does not apply to {encoder.name}; leave it out (presets exist for libx264, libx265 and libsvtav1)")
    if crf is not None or default_crf is not None:
        options["crf"] = str(crf if crf is not None else default_crf)
    if preset is not None or default_preset is not None:
        options["preset"] = preset or default_preset
    if out_format in ANNEXB_FORMATS:
        options["bf"] = "0"  # AVI keeps no presentation times, so frames go in display order
    formats = [f.name for f in encoder.video_formats or []]
    pix_fmt = next((f for f in (clip.pix_fmt, "yuv420p10le" if clip.deep else "yuv420p", "yuv420p") if f in formats), None)
    if pix_fmt is None:
        pix_fmt = formats[0] if formats else clip.pix_fmt
    fmt = av.VideoFormat(pix_fmt)
    if clip.deep and fmt.components[0].bits <= 8:
        _note(f"note: {clip.path}: {encoder.name} has no 10-bit format here; the output is {pix_fmt}")
    step_w, step_h = 64 // fmt.chroma_width(64), 64 // fmt.chroma_height(64)
    width, height = clip.width * scale // step_w * step_w, clip.height * scale // step_h * step_h
    if fmt.is_rgb:
        colorspace, color_range = 0, 2  # RGB, full range
    elif av.VideoFormat(clip.pix_fmt).is_rgb:
        colorspace, color_range = 1, 1  # an RGB source into YUV: BT.709, limited range
    else:
        colorspace, color_range = clip.colorspace, clip.color_range
    segment_format = next(f for f in SEGMENT_FORMATS if f == "matroska" or _holds(f, encoder.name))
    encoding = Encoding(encoder.name, options, pix_fmt, width, height, colorspace, color_range, segment_format, segment_seconds)
    _check_encoder(encoding, clip)
    return out_format, encoding


def _container_info(dst: Path) -> tuple[str, str]:
    """The name of dst's container format and its default video codec, found by opening a scratch file."""
    scratch = dst.with_name(f".{dst.stem}.{uuid.uuid4().hex[:8]}.probe{dst.suffix}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(scratch), "w") as out:
            return out.format.name, out.default_video_codec
    except ValueError as exc:
        raise VideoError(f"{dst}: FFmpeg knows no container for the extension {dst.suffix!r}; use .mp4, .mkv, .mov or .webm") from exc
    except OSError as exc:
        raise VideoError(f"{dst.parent}: cannot write here ({exc.strerror or exc}); choose another output folder") from exc
    finally:
        scratch.unlink(missing_ok=True)


def _holds(container_format: str, codec: str) -> bool:
    """Whether a container format can hold a codec, as FFmpeg answers when a stream is added (unsure counts as yes)."""
    with av.open(io.BytesIO(), "w", format=container_format) as out:
        try:
            out.add_stream(codec)
        except ValueError:
            return False
        return True


def _check_encoder(encoding: Encoding, clip: Clip) -> None:
    """Open the encoder once with the real settings, so bad --crf or --preset values fail before any work."""
    context = av.CodecContext.create(encoding.codec, "w")
    context.width, context.height, context.pix_fmt = encoding.width, encoding.height, encoding.pix_fmt
    context.time_base, context.framerate = clip.time_base, clip.rate
    context.options = dict(encoding.options)
    try:
        context.open()
    except av.error.FFmpegError as exc:
        shown = ", ".join(f"{k}={v}" for k, v in encoding.options.items()) or "no options"
        raise VideoError(f"{encoding.codec} refused these settings ({shown}, {encoding.width}x{encoding.height} "
                         f"{encoding.pix_fmt}): {exc.strerror}; change --crf or --preset") from exc


def _fingerprint(clip: Clip, encoding: Encoding, model: A2N, backend: str | None, precision: str | None) -> dict[str, Any]:
    """What makes the segments what they are; resuming needs the same, or the joined clip would mix two jobs."""
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    stat = Path(clip.path).stat()
    return {"source": str(Path(clip.path).resolve()), "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
            "weights": digest.hexdigest(), "scale": model.scale, "backend": backend, "precision": precision,
            "encoding": asdict(encoding)}


def _prepare_work(work: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """Create the work folder, or check that the one there belongs to the same job when resuming."""
    job = work / "job.json"
    if work.exists() and not resume:
        raise VideoError(f"{work}: unfinished work of an earlier run is here; pass --resume to continue it, "
                         "or delete the folder to start again")
    if job.exists():
        earlier = json.loads(job.read_text())
        changed = sorted(k for k in fingerprint if earlier.get(k) != fingerprint[k])
        if changed:
            raise VideoError(f"{work}: the unfinished work here was made with other settings ({', '.join(changed)}); "
                             "run with the same options, or delete the folder to start again")
        return
    work.mkdir(parents=True, exist_ok=True)
    _write_json(job, fingerprint)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a small JSON file atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _finished(work: Path) -> dict[int, dict[str, Any]]:
    """The manifests of the finished segments, by index."""
    return {int(p.stem): json.loads(p.read_text()) for p in work.glob("[0-9]*.json")}


def _segment_of(clip: Clip, encoding: Encoding, pts: int) -> int:
    """The index of the segment a source timestamp belongs to."""
    return int((pts - clip.first_pts) * clip.time_base // Fraction(encoding.segment_seconds))


def _segment_start(clip: Clip, encoding: Encoding, index: int) -> int:
    """The first source timestamp of segment index."""
    return clip.first_pts + -(-Fraction(encoding.segment_seconds) * index // clip.time_base)


def _encode_segments(clip: Clip, encoding: Encoding, work: Path, upscale: Callable[[np.ndarray], np.ndarray],
                     shard: tuple[int, int], bar: tqdm) -> None:
    """Encode this process's unfinished segments: all of them, or every world-th from rank on."""
    rank, world = shard
    index = rank
    while True:
        done = _finished(work)
        if index in done:
            if done[index]["last"]:
                return
            index += world
            continue
        stop = min((i for i in done if i > index), default=None) if world == 1 else index + 1
        if _encode_run(clip, encoding, work, upscale, index, stop, bar):
            return
        index = stop if world == 1 else index + world


def _encode_run(clip: Clip, encoding: Encoding, work: Path, upscale: Callable[[np.ndarray], np.ndarray],
                first: int, stop: int | None, bar: tqdm) -> bool:
    """Encode segments first..stop-1 (stop None: to the end) from one decoding pass; True when the clip ended.

    The decoder runs one frame ahead in a thread and the encoder up to two frames behind in another,
    so both overlap with the model and memory stays at a few frames. Segments without frames (a gap
    in a variable-frame-rate clip) get a manifest too.
    """
    frames = _frames(clip, _segment_start(clip, encoding, first), seek=first > 0)
    segment: _Segment | None = None
    expected, ended = first, True
    pending: deque = deque()
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        try:
            ahead = reader.submit(next, frames, None)
            while (frame := ahead.result()) is not None:
                index = max(_segment_of(clip, encoding, frame.pts), segment.index if segment else first)
                if stop is not None and index >= stop:
                    ended = False
                    break
                if segment is None or index != segment.index:
                    if segment is not None:
                        pending.append(writer.submit(segment.finish, False))
                    _write_empty(work, range(expected, index))
                    segment, expected = _Segment(work, index, encoding, clip), index + 1
                ahead = reader.submit(next, frames, None)
                pending.append(writer.submit(segment.add, frame.pts, frame.duration, upscale(frame.rgb)))
                bar.update()
                while len(pending) > 2:
                    pending.popleft().result()
            if segment is not None:
                pending.append(writer.submit(segment.finish, ended))
            while pending:
                pending.popleft().result()
            if not ended:
                _write_empty(work, range(expected, stop))
            elif segment is None:  # no frame from here on: the clip ended before this segment
                _write_empty(work, range(first, first + 1), last=True)
        finally:
            reader.submit(frames.close).result()
            if segment is not None:
                writer.submit(segment.abandon).result()
    return ended


def _write_empty(work: Path, indices: range, last: bool = False) -> None:
    """Manifests of segments without frames: a gap in a variable-frame-rate clip, or past its end (last)."""
    for index in indices:
        _write_json(work / f"{index:06d}.json", {"frames": 0, "last": last, "file": None})


class _Segment:
    """One segment being encoded: source-timed frames in, a segment file and its manifest out."""

    def __init__(self, work: Path, index: int, encoding: Encoding, clip: Clip) -> None:
        ext = {"mp4": ".mp4", "mov": ".mov", "matroska": ".mkv"}[encoding.segment_format]
        self.index, self.encoding, self.clip, self.frames, self.offset = index, encoding, clip, 0, 0
        self.path = work / f"{index:06d}{ext}"
        self.partial = work / f"{index:06d}.partial{ext}"
        self.container: Any = None
        self.stream: Any = None

    def _open(self) -> None:
        """Create the segment file and its encoder, tagged with the source's colour description."""
        clip, enc = self.clip, self.encoding
        self.container = av.open(str(self.partial), "w", format=enc.segment_format)
        stream = self.container.add_stream(enc.codec)
        stream.width, stream.height, stream.pix_fmt = enc.width, enc.height, enc.pix_fmt
        stream.time_base = clip.time_base
        context = stream.codec_context
        context.time_base, context.framerate = clip.time_base, clip.rate
        context.flags |= int(av.codec.context.Flags.frame_duration)
        if clip.sample_aspect_ratio:
            context.sample_aspect_ratio = clip.sample_aspect_ratio
        context.colorspace, context.color_range = enc.colorspace, enc.color_range
        context.color_primaries, context.color_trc = clip.color_primaries, clip.color_trc
        context.options = dict(enc.options)
        self.stream = stream

    def add(self, pts: int, duration: int, rgb: np.ndarray) -> None:
        """Encode one upscaled frame at its source timestamp (an odd side cropped for subsampled chroma).

        The file stores timestamps from the segment's first frame on (offset in the manifest): an mp4
        starting later than 0 would round its start to the millisecond of the movie time scale.
        """
        if self.container is None:
            self._open()
            self.offset = pts
        enc, clip = self.encoding, self.clip
        rgb = np.ascontiguousarray(rgb[: enc.height, : enc.width])
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
        convert = _conversion(rgb.dtype == np.uint16)
        if av.VideoFormat(enc.pix_fmt).is_rgb:
            frame = frame.reformat(format=enc.pix_fmt, interpolation=convert)
        else:
            frame = frame.reformat(format=enc.pix_fmt, dst_colorspace=SWS_MATRIX.get(enc.colorspace),
                                   dst_color_range=RANGE_NAMES.get(enc.color_range), interpolation=convert)
        frame.pts, frame.duration, frame.time_base = pts - self.offset, duration, clip.time_base
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def finish(self, last: bool) -> None:
        """Flush the encoder, rename the file into place and write the manifest that marks the segment finished."""
        self.container.mux(self.stream.encode(None))
        self.container.close()
        self.container = None
        os.replace(self.partial, self.path)
        _write_json(self.path.with_suffix(".json"), {"frames": self.frames, "last": last, "file": self.path.name,
                                                         "offset": self.offset})

    def abandon(self) -> None:
        """Close and delete an unfinished segment file (after an error or an interruption)."""
        if self.container is not None:
            try:
                self.container.close()
            except av.error.FFmpegError:
                pass
            self.container = None
        self.partial.unlink(missing_ok=True)


def _wait_for_segments(work: Path) -> int:
    """Wait until every segment up to the clip's last one is finished (other processes may still be encoding); returns its index."""
    while True:
        done = _finished(work)
        last = min((i for i, m in done.items() if m["last"]), default=None)
        if last is not None and all(i in done for i in range(last + 1)):
            return last
        time.sleep(POLL_SECONDS)


def _join(clip: Clip, work: Path, last: int, dst: Path, out_format: str) -> None:
    """Concatenate the segments' packets with the source's audio and subtitles into dst, written through the work folder."""
    manifests = _finished(work)
    segments = [(work / manifests[i]["file"], manifests[i]["offset"]) for i in range(last + 1) if manifests[i]["frames"]]
    if not segments:
        raise VideoError(f"{clip.path}: no frame could be decoded; the file is damaged")
    joined = work / f"joined{dst.suffix}"
    options = {"movflags": "+faststart"} if out_format.startswith("mov") or "mp4" in out_format else {}
    path = Path(clip.path)
    with _open(path) as source, av.open(str(joined), "w", options=options) as out:
        video_in = source.streams[clip.stream]
        with av.open(str(segments[0][0])) as first:
            template = first.streams.video[0]
            video = out.add_stream_from_template(template)
            annexb = ANNEXB_FILTERS.get(template.codec_context.name) if out_format in ANNEXB_FORMATS else None
            bsf = av.BitStreamFilterContext(annexb, template, video) if annexb else None
        if out_format in ANNEXB_FORMATS:
            video.time_base = 1 / clip.rate  # AVI counts frames: one tick each
        _copy_tags(video_in, video, keys=("language", "title", "handler_name"))
        if clip.rotation:
            video.set_display_rotation(clip.rotation)
        out.metadata.update({k: v for k, v in source.metadata.items() if k.lower() not in ("encoder", "duration")})
        copied, transcoded = _other_streams(source, clip, out, path)
        merged = heapq.merge(_segment_packets(segments, clip.time_base, video, bsf), _source_packets(source, copied, transcoded, path),
                             key=_packet_time)
        for packet, target in merged:
            if target is None:
                for decoded in packet.decode():
                    out.mux(transcoded[packet.stream_index].encode(decoded))
            else:
                packet.stream = target
                out.mux(packet)
        for stream in transcoded.values():
            out.mux(stream.encode(None))
    _check_length(clip, joined)
    os.replace(joined, dst)
    shutil.rmtree(work, ignore_errors=True)


def _copy_tags(source: Any, target: Any, keys: tuple[str, ...] | None = None) -> None:
    """Copy a stream's metadata (all of it, or only keys) and its disposition (default, forced, ...)."""
    target.metadata.update({k: v for k, v in source.metadata.items() if (keys is None or k.lower() in keys) and k.lower() != "duration"})
    target.disposition = source.disposition


def _other_streams(source: Any, clip: Clip, out: Any, path: Path) -> tuple[dict[int, Any], dict[int, Any]]:
    """Output streams for the source's audio, subtitles and (Matroska) attachments: copied where the container takes
    them, audio transcoded otherwise (with a note); other streams left out with a note."""
    copied: dict[int, Any] = {}
    transcoded: dict[int, Any] = {}
    for stream in source.streams:
        if stream.index == clip.stream:
            continue
        name = stream.codec_context.name if stream.codec_context else "an unknown codec"
        fonts = stream.type == "attachment" and "matroska" in out.format.name  # the fonts of styled subtitles
        if stream.type in ("audio", "subtitle") or fonts:
            try:
                copied[stream.index] = out.add_stream_from_template(stream)
                _copy_tags(stream, copied[stream.index])
                continue
            except ValueError:
                pass
        if stream.type == "audio" and stream.codec_context is not None:
            codec = next((c for c in AUDIO_FALLBACKS if _holds(out.format.name, c)), None)
            if codec is not None:
                target = out.add_stream(codec, rate=stream.codec_context.sample_rate, layout=stream.codec_context.layout.name)
                _copy_tags(stream, target)
                transcoded[stream.index] = target
                _note(f"note: {path}: the {out.format.name} container cannot hold {name} audio (stream {stream.index}); "
                      f"transcoded to {codec}")
                continue
        _note(f"note: {path}: the {out.format.name} container cannot hold {stream.type} stream {stream.index} ({name}); left out")
    return copied, transcoded


def _segment_packets(segments: list[tuple[Path, int]], time_base: Fraction, target: Any, bsf: Any) -> Iterator[tuple[Any, Any]]:
    """The video packets of the segments in order, at source time, with decode timestamps kept increasing across the joins.

    A segment's offset is in the source time base; its file may count in a finer one (mp4 doubles small time
    scales). bsf, when given, rewrites the packets for the output container (H.264 start codes for AVI).
    """
    last_dts = None
    for path, offset in segments:
        with av.open(str(path)) as segment:
            stream = segment.streams.video[0]
            shift = round(offset * time_base / stream.time_base)
            for packet in segment.demux(stream):
                if packet.size == 0:
                    continue
                packet.pts = packet.pts + shift if packet.pts is not None else None
                packet.dts = packet.dts + shift if packet.dts is not None else None
                for out in bsf.filter(packet) if bsf else [packet]:
                    if last_dts is not None and out.dts is not None and out.dts <= last_dts:
                        out.dts = last_dts + 1
                    last_dts = out.dts if out.dts is not None else last_dts
                    yield out, target


def _source_packets(source: Any, copied: dict[int, Any], transcoded: dict[int, Any], path: Path) -> Iterator[tuple[Any, Any]]:
    """The source's audio and subtitle packets in file order, each with its output stream (None: to be transcoded)."""
    wanted = [source.streams[i] for i in list(copied) + list(transcoded)]
    if not wanted:
        return
    packets = source.demux(wanted)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            _note(f"warning: {path}: reading its sound or subtitles stopped early ({exc.strerror})")
            return
        if packet.size:
            yield packet, copied.get(packet.stream_index)


def _packet_time(item: tuple[Any, Any]) -> float:
    """A packet's decode time in seconds, for interleaving."""
    packet = item[0]
    stamp = packet.dts if packet.dts is not None else packet.pts
    return float(stamp * packet.time_base) if stamp is not None and packet.time_base else 0.0


def _check_length(clip: Clip, joined: Path) -> None:
    """Warn when the frames end well before the duration the source declares: it was most likely cut short."""
    if clip.duration is None:
        return
    with av.open(str(joined)) as out:
        stream = out.streams.video[0]
        end = max(((p.pts + p.duration) * p.time_base for p in out.demux(stream) if p.pts is not None), default=0)
    if float(end) < clip.duration - 2 / float(clip.rate):
        _note(f"warning: {clip.path}: the frames end at {float(end):.3f} s but the file says it lasts {clip.duration:.3f} s; "
              "it looks cut short, so the output ends there too")

"""Tests for a2n.video and `a2n upscale clip.mp4`: frames, timestamps, sound, subtitles, colour, sizes, resume, bad input.

Every clip is made here with PyAV (tiny frames, x2 unless said) and upscaled with the shipped weights on
torch fp32, so the results do not depend on the machine.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

av = pytest.importorskip("av", reason="the video tests need PyAV: pip install 'a2n[video]'")

import torch  # noqa: E402

from a2n import video  # noqa: E402
from a2n.cli import main  # noqa: E402
from a2n.inference import load_model  # noqa: E402
from a2n.video import VideoError, upscale_video  # noqa: E402

W, H = 48, 36
PATCH = (slice(6, 26), slice(8, 32))  # rows, columns of a flat patch in the source frames
PATCH_RGB = (200, 60, 90)
FPS = 24
OPTIONS = {"backend": "torch", "precision": "fp32", "progress": False, "segment_seconds": 0.25}
LOSSLESS = {**OPTIONS, "codec": "ffv1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: tiny frames run faster so, and a busy machine slows them less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(2)


def picture(i: int, w: int = W, h: int = H) -> np.ndarray:
    """Frame i of a moving pattern with a flat colour patch."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.dstack([(x * 5 + i * 7) % 256, (y * 7 + i * 3) % 256, ((x + y) * 4) % 256]).astype(np.uint8)
    rgb[PATCH] = PATCH_RGB
    return rgb


def make_clip(path: Path, frames: int = 16, size: tuple[int, int] = (W, H), codec: str = "libx264", pix_fmt: str = "yuv420p",
              pts: list[int] | None = None, time_base: Fraction = Fraction(1, FPS), audio: tuple[tuple[str, str], ...] = (("aac", "eng"),),
              subtitle: bool = False, deep: bool = False, colorspace: str = "itu709", rotation: int = 0, options: dict | None = None) -> Path:
    """Write a test clip: the moving pattern (pts given or one per 1/FPS s), sine tones, optionally a subtitle track."""
    w, h = size
    out = av.open(str(path), "w", options=options or {})
    stream = out.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    stream.codec_context.time_base = time_base
    stream.codec_context.colorspace = {"itu709": 1, "bt2020": 9}[colorspace]
    stream.codec_context.color_range = 1
    stream.metadata["language"] = "fra"
    if rotation:
        stream.set_display_rotation(rotation)
    tracks = []
    for codec_name, language in audio:
        track = out.add_stream(codec_name, rate=48000)
        track.layout = "mono"
        track.metadata["language"] = language
        tracks.append(track)
    if subtitle:
        subs = out.add_mux_stream("subrip")
        subs.time_base = Fraction(1, 1000)
        subs.metadata["language"] = "deu"
    for i in range(frames):
        rgb = picture(i, w, h)
        frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint16) * 257 if deep else rgb, format="rgb48le" if deep else "rgb24")
        frame = frame.reformat(format=pix_fmt, dst_colorspace=colorspace, dst_color_range="MPEG")
        frame.pts = pts[i] if pts else round(Fraction(i, FPS) / time_base)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
    if subtitle:
        for i, start in enumerate((0, 300, 500)):
            packet = av.Packet(f"line {i}".encode())
            packet.stream, packet.pts, packet.dts, packet.duration = subs, start, start, 150
            packet.time_base = Fraction(1, 1000)
            out.mux(packet)
    samples = 48000 * frames // FPS
    for n, track in enumerate(tracks):
        for start in range(0, samples, 1024):
            t = np.arange(start, min(start + 1024, samples)) / 48000
            tone = (np.sin(2 * np.pi * (440 + 220 * n) * t) * 8000).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            out.mux(track.encode(frame))
        out.mux(track.encode(None))
    out.close()
    return path


def decode(path: Path) -> list:
    """Every video frame of a file (PyAV frames)."""
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def packets(path: Path, kind: str, n: int = 0) -> list[tuple[int, bytes]]:
    """(pts, bytes) of every packet of the n-th stream of a kind."""
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[n]
        return [(p.pts, bytes(p)) for p in container.demux(stream) if p.size]


def video_end(path: Path) -> float:
    """Where the video stream ends, in seconds: the last frame's time plus its duration."""
    frames = decode(path)
    return float((frames[-1].pts + frames[-1].duration) * frames[-1].time_base)


def patch_value(frame, scale: int, deep: bool = False) -> np.ndarray:
    """Mean colour of the inside of the flat patch (its edges left out), in 8-bit levels."""
    rgb = frame.to_ndarray(format="rgb48le" if deep else "rgb24").astype(np.float64) / (257 if deep else 1)
    rows, cols = PATCH
    return rgb[(rows.start + 3) * scale:(rows.stop - 3) * scale, (cols.start + 3) * scale:(cols.stop - 3) * scale].mean(axis=(0, 1))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> tuple[Path, Path]:
    """A 16-frame mp4 with sound and a 90-degree rotation tag, and its uninterrupted x2 output."""
    folder = tmp_path_factory.mktemp("clip")
    source = make_clip(folder / "clip.mp4", rotation=90)
    assert upscale_video(source, folder / "clip_x2.mp4", model, **OPTIONS) == folder / "clip_x2.mp4"
    return source, folder / "clip_x2.mp4"


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, clip: tuple[Path, Path], model: torch.nn.Module) -> tuple[Path, Path]:
    """The clip and its uninterrupted x2 output in FFV1, for comparing runs bit for bit: libx264 is not
    deterministic run to run on CPUs with AVX-512 (README, Video), FFV1 is."""
    out = tmp_path_factory.mktemp("lossless") / "clip_x2.mp4"
    assert upscale_video(clip[0], out, model, **LOSSLESS) == out
    return clip[0], out


def test_frames_timing_sound_and_tags_are_kept(clip: tuple[Path, Path]) -> None:
    source, out = clip
    before, after = decode(source), decode(out)
    assert len(after) == len(before) == 16
    assert all((f.width, f.height) == (2 * W, 2 * H) for f in after)
    assert [(f.pts, f.time_base) for f in after] == [(f.pts, f.time_base) for f in before]
    assert abs(video_end(out) - video_end(source)) <= 1 / FPS
    with av.open(str(source)) as a, av.open(str(out)) as b:
        assert abs(a.duration - b.duration) <= 1e6 / FPS
        assert b.streams.video[0].metadata["language"] == "fra"
        assert b.streams.audio[0].metadata["language"] == "eng"
    assert packets(out, "audio") == packets(source, "audio")
    assert after[0].rotation == 90
    assert (after[0].colorspace, after[0].color_range) == (1, 1)  # BT.709, limited
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4", "clip_x2.mp4"]  # work folder gone


def test_flat_colour_keeps_its_value(clip: tuple[Path, Path]) -> None:
    source, out = clip
    for before, after in zip(decode(source), decode(out)):
        assert np.abs(patch_value(after, 2) - patch_value(before, 1)).max() <= 1.0


def test_resume_gives_the_uninterrupted_output(lossless: tuple[Path, Path], model: torch.nn.Module, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    source, whole = lossless
    out = tmp_path / "resumed.mp4"
    finish = video._Segment.finish

    def interrupt_after_two(segment: video._Segment, last: bool) -> None:
        finish(segment, last)
        if segment.index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(video._Segment, "finish", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(source, out, model, **LOSSLESS)
    assert "run the same command with --resume" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(VideoError, match="pass --resume to continue it"):
        upscale_video(source, out, model, **LOSSLESS)
    with pytest.raises(VideoError, match=r"was made with other settings \(encoding\); run with the same options"):
        upscale_video(source, out, model, resume=True, **{**LOSSLESS, "codec": "libx264"})
    monkeypatch.setattr(video._Segment, "finish", finish)
    encoded = []
    add = video._Segment.add

    def count(segment: video._Segment, pts: int, duration: int, rgb: np.ndarray) -> None:
        encoded.append(pts)
        add(segment, pts, duration, rgb)

    monkeypatch.setattr(video._Segment, "add", count)
    upscale_video(source, out, model, resume=True, **LOSSLESS)
    assert len(encoded) == 4  # segments of 6 frames: the first two were not done again
    assert all(np.array_equal(a.to_ndarray(format="rgb24"), b.to_ndarray(format="rgb24")) for a, b in zip(decode(out), decode(whole)))
    assert [f.pts for f in decode(out)] == [f.pts for f in decode(whole)]
    assert packets(out, "video") == packets(whole, "video")


def test_two_processes_share_one_clip(lossless: tuple[Path, Path], model: torch.nn.Module, tmp_path: Path) -> None:
    source, whole = lossless
    out = tmp_path / "shared.mp4"
    assert upscale_video(source, out, model, shard=(1, 2), **LOSSLESS) is None  # rank 1 encodes its segments and leaves
    assert not out.exists()
    assert upscale_video(source, out, model, shard=(0, 2), **LOSSLESS) == out  # rank 0 encodes the rest and joins
    assert packets(out, "video") == packets(whole, "video")


def test_variable_frame_rate_without_sound(model: torch.nn.Module, tmp_path: Path) -> None:
    stamps = [0, 50, 80, 130, 160, 300, 330, 380, 400, 700, 720, 760]  # ms: uneven gaps, one longer than a segment
    source = make_clip(tmp_path / "vfr.mkv", frames=len(stamps), pts=stamps, time_base=Fraction(1, 1000), audio=())
    out = upscale_video(source, tmp_path / "vfr_x2.mkv", model, **OPTIONS)
    assert [f.pts for f in decode(out)] == stamps
    assert abs(video_end(out) - video_end(source)) <= 1 / FPS
    with av.open(str(out)) as container:
        assert [s.type for s in container.streams] == ["video"]


def test_ten_bit_source_comes_out_ten_bit(model: torch.nn.Module, tmp_path: Path) -> None:
    source = make_clip(tmp_path / "deep.mkv", frames=6, pix_fmt="yuv420p10le", deep=True, colorspace="bt2020", audio=())
    out = upscale_video(source, tmp_path / "deep_x2.mkv", model, **OPTIONS)
    before, after = decode(source), decode(out)
    assert {f.format.name for f in after} == {"yuv420p10le"}
    assert (after[0].colorspace, after[0].color_range) == (9, 1)  # BT.2020, limited
    for a, b in zip(before, after):
        assert np.abs(patch_value(b, 2, deep=True) - patch_value(a, 1, deep=True)).max() <= 1.0


@pytest.mark.parametrize("pix_fmt, expected", [("yuv420p", (98, 74)), ("yuv444p", (99, 75))])
def test_odd_sizes(pix_fmt: str, expected: tuple[int, int], tmp_path: Path) -> None:
    """x3 of 33x25 is 99x75: a 4:2:0 output loses its last column and row, a 4:4:4 one keeps every pixel."""
    codec = "ffv1" if pix_fmt == "yuv420p" else "libx264"
    source = make_clip(tmp_path / "odd.mkv", frames=4, size=(33, 25), codec=codec, pix_fmt=pix_fmt, audio=())
    out = upscale_video(source, tmp_path / "odd_x3.mkv", load_model(3), **OPTIONS)
    frames = decode(out)
    assert len(frames) == 4 and {(f.width, f.height) for f in frames} == {expected}
    assert frames[0].format.name == pix_fmt


def test_two_audio_tracks_and_a_subtitle_are_copied(model: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_clip(tmp_path / "multi.mkv", frames=8, audio=(("aac", "eng"), ("flac", "spa")), subtitle=True)
    out = upscale_video(source, tmp_path / "multi_x2.mkv", model, **OPTIONS)
    with av.open(str(out)) as container:
        assert [(s.type, s.metadata.get("language")) for s in container.streams] == [
            ("video", "fra"), ("audio", "eng"), ("audio", "spa"), ("subtitle", "deu")]
    for kind, n in (("audio", 0), ("audio", 1), ("subtitles", 0)):
        assert packets(out, kind, n) == packets(source, kind, n)
    as_mp4 = upscale_video(source, tmp_path / "multi_x2.mp4", model, **OPTIONS)
    assert "cannot hold subtitle stream 3 (srt); left out" in capsys.readouterr().err
    assert [data for _, data in packets(as_mp4, "audio", 1)] == [data for _, data in packets(source, "audio", 1)]  # FLAC as it is


def test_audio_the_container_cannot_hold_is_transcoded(model: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_clip(tmp_path / "clip.mp4", frames=8)
    out = upscale_video(source, tmp_path / "clip_x2.webm", model, **OPTIONS)
    assert "cannot hold aac audio (stream 1); transcoded to libopus" in capsys.readouterr().err
    with av.open(str(out)) as container:
        assert [s.codec_context.name for s in container.streams] == ["vp9", "opus"]
        assert abs(container.duration - 8e6 / FPS) <= 1e6 / FPS + 30_000  # Opus adds its pre-skip
    assert len(decode(out)) == 8


def test_truncated_file_gives_what_decodes_with_a_warning(model: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    whole = make_clip(tmp_path / "whole.mkv", frames=24, options={"cluster_size_limit": "2000"})
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = upscale_video(cut, tmp_path / "cut_x2.mkv", model, **OPTIONS)
    assert 0 < len(decode(out)) < 24
    err = capsys.readouterr().err
    assert "cut.mkv" in err and "looks cut short, so the output ends there too" in err


def test_bad_inputs_get_one_line_naming_the_file(model: torch.nn.Module, tmp_path: Path) -> None:
    good = make_clip(tmp_path / "good.mp4", frames=2, audio=())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    empty = tmp_path / "empty.mkv"
    empty.touch()
    sound = tmp_path / "sound.mka"
    with av.open(str(sound), "w") as out:
        track = out.add_stream("flac", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        out.mux(track.encode(frame))
        out.mux(track.encode(None))
    (tmp_path / "taken.mp4").write_bytes(b"earlier result")
    mp4_without_index = tmp_path / "cut.mp4"
    mp4_without_index.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (text, "x.mp4", {}, "notes.mp4: not a video FFmpeg can read"),
        (empty, "x.mp4", {}, "empty.mkv: the file is empty"),
        (tmp_path / "missing.mp4", "x.mp4", {}, "missing.mp4: no such file"),
        (sound, "x.mp4", {}, "sound.mka: has no video stream (audio only)"),
        (mp4_without_index, "x.mp4", {}, "cut.mp4: not a video FFmpeg can read, or cut short before its index"),
        (good, "good.mp4", {"overwrite": True}, "good.mp4: the output would replace the input"),
        (good, "taken.mp4", {}, "taken.mp4: already exists; pass --overwrite"),
        (good, "x.mp4", {"codec": "nope"}, "unknown video codec 'nope'"),
        (good, "x.mp4", {"codec": "aac"}, "'aac' is not a video codec (audio)"),
        (good, "x.mov", {"codec": "ffv1"}, "the mov container cannot hold ffv1 video"),
        (good, "x.mkv", {"codec": "ffv1", "crf": 20}, "--crf does not apply to ffv1"),
        (good, "x.mp4", {"preset": "fastest-ever"}, "libx264 refused these settings"),
        (good, "x.unknownext", {}, "FFmpeg knows no container for the extension '.unknownext'"),
    ]
    for src, dst, extra, message in cases:
        with pytest.raises(VideoError) as caught:
            upscale_video(src, tmp_path / dst, model, **{**OPTIONS, **extra})
        assert message in str(caught.value) and "\n" not in str(caught.value), (message, str(caught.value))
    assert (tmp_path / "taken.mp4").read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4", "empty.mkv", "good.mp4", "notes.mp4", "sound.mka", "taken.mp4"]


def test_cli_upscales_clips_and_images_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "clip.mkv", frames=4)
    Image.fromarray(picture(0)).save(folder / "still.png")
    args = ["upscale", str(folder), "-o", str(tmp_path / "out"), "--scale", "2", "--backend", "torch", "--precision", "fp32",
            "--threads", "1", "--crf", "20", "--preset", "veryfast"]
    assert main(args) == 0
    assert "2 upscaled, 0 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_x2.mkv", "still_x2.png"]
    assert len(decode(tmp_path / "out" / "clip_x2.mkv")) == 4
    assert main(args) == 1
    assert "clip_x2.mkv already exists; pass --overwrite" in capsys.readouterr().err


def test_plan_keeps_clips_in_their_container_and_gives_every_process_each_clip(tmp_path: Path) -> None:
    from a2n import batch

    (tmp_path / "a.mp4").write_bytes(b"clip")
    (tmp_path / "b.bmp").write_bytes(b"image")
    (tmp_path / "c.bmp").write_bytes(b"image")
    plan = batch.make_plan([str(tmp_path)], str(tmp_path / "out"), 2, fmt="png")
    assert sorted(t.name for _, t in plan.jobs) == ["a_x2.mp4", "b_x2.png", "c_x2.png"]
    shares = [[s.name for s, _ in batch.make_plan([str(tmp_path)], None, 2, shard=(rank, 2)).jobs] for rank in (0, 1)]
    assert shares == [["a.mp4", "c.bmp"], ["a.mp4", "b.bmp"]]
    assert batch.make_plan([str(tmp_path / "a.mp4")], str(tmp_path / "a.mkv"), 2, fmt="jpg").jobs[0][1].name == "a.mkv"

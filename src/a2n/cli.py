"""The `a2n` command line: info, degrade, evaluate (and the commands of later modules)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from a2n import A2NError, __version__, shipped_weights_path


class UserError(A2NError):
    """A problem the user can fix; printed as one line, without a traceback."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_info(args: argparse.Namespace) -> None:
    from a2n.model import A2N, count_macs, count_parameters

    model = A2N(scale=args.scale, variant=args.variant)
    h, w = 720 // args.scale, 1280 // args.scale
    print(f"A2N variant {args.variant}, x{args.scale}")
    print(f"parameters: {count_parameters(model):,}")
    print(f"multiply-adds for a 1280x720 output ({w}x{h} input): {count_macs(model, h, w) / 1e9:.1f} G")
    if args.weights is None:
        return
    from a2n import analysis, io
    from a2n.weights import build_model, file_pixel_range, read_checkpoint

    model = build_model(args.scale, args.variant, args.weights or None)
    path = args.weights or shipped_weights_path(args.scale, args.variant)
    _, meta = read_checkpoint(path)
    print(f"weights: {path}")
    print(f"pixel range: 0..{file_pixel_range(meta):g}")
    for key in ("trained", "compute", "set5_psnr", "step", "converted_from"):
        if meta.get(key):
            print(f"{key.replace('_', ' ')}: {meta[key]}")
    sample = Path(__file__).parent / "samples" / "village.png"
    result = analysis.branch_weights(model, [("village", None, io.read_rgb8(sample))])
    print(analysis.describe_adm(result) + f" [measured on {sample.name}]")


def cmd_degrade(args: argparse.Namespace) -> None:
    from a2n import io
    from a2n.resize import imresize, modcrop

    files = io.list_images(_existing_dir(args.hr_dir))
    if not files:
        raise UserError(f"{args.hr_dir}: no images found (PNG, JPEG, WebP, TIFF, BMP)")
    out = Path(args.out_dir)
    for path in files:
        img = io.open_image(path)
        arr = io.read_rgb8(path)
        if img.mode in ("L", "I;16", "I"):
            arr = arr[..., 0]
        target = out / f"{path.stem}x{args.scale}.png"
        if target.exists() and not args.overwrite:
            raise UserError(f"{target}: already exists; pass --overwrite to replace it")
        io.write_png(target, imresize(modcrop(arr, args.scale), 1.0 / args.scale))
    print(f"wrote {len(files)} LR images to {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from a2n.evaluation import evaluate_folder, format_table
    from a2n.weights import build_model

    for d in args.data:
        _existing_dir(d)
    model = None
    if not args.bicubic_only:
        model = build_model(args.scale, args.variant, args.weights)
        if args.weights is None:
            print(f"using the shipped {args.variant} x{args.scale} weights", file=sys.stderr)
    results, costs = [], []
    for d in args.data:
        scored = evaluate_folder(d, args.scale, model, save_images=args.save_images, backend=args.backend, precision=args.precision,
                                 ensemble=args.ensemble, tile=args.tile)
        results += scored
        if model is not None and ((args.backend, args.precision) != ("torch", "fp32") or args.tile):  # what the faster path costs
            reference = evaluate_folder(d, args.scale, model, ensemble=args.ensemble)[-1]
            costs.append({"dataset": reference.dataset, "scale": args.scale, "backend": args.backend, "precision": args.precision,
                          "tile": args.tile, "psnr": scored[-1].psnr, "fp32_psnr": reference.psnr, "cost_db": reference.psnr - scored[-1].psnr})
    print(format_table(results))
    for c in costs:
        tiles = f" in tiles of {c['tile']}" if c["tile"] else ""
        print(f"{c['dataset']} x{c['scale']}: {c['backend']} {c['precision']}{tiles} costs {c['cost_db']:+.4f} dB PSNR against "
              f"torch fp32 ({c['psnr']:.4f} vs {c['fp32_psnr']:.4f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": [r.to_dict() for r in results], "costs": costs}, indent=1))


def cmd_train(args: argparse.Namespace) -> None:
    from a2n.training import load_config, train

    if args.config is None and not args.overrides:
        raise UserError("give --config FILE (see configs/) and/or key=value overrides")
    train(load_config(args.config, args.overrides), resume=args.resume)


def cmd_plot(args: argparse.Namespace) -> None:
    from a2n.training import plot_curves

    print(plot_curves(args.run_dir, args.output or Path(args.run_dir[0]) / "curves.png"))


def cmd_convert(args: argparse.Namespace) -> None:
    from a2n.weights import convert_file

    if args.pixel_range <= 0:
        raise UserError(f"--pixel-range must be positive (1 or 255), got {args.pixel_range:g}")
    if Path(args.output).exists() and not args.overwrite:
        raise UserError(f"{args.output}: already exists; pass --overwrite to replace it")
    model = convert_file(args.input, args.output, args.pixel_range, args.scale)
    print(f"wrote {args.output}: {model.variant} x{model.scale} for pixels in 0..{args.pixel_range:g}")


def cmd_upscale(args: argparse.Namespace) -> None:
    from a2n import batch, io

    for name in ("tile", "max_memory", "max_pixels", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number")
    if args.max_pixels is not None:
        io.set_max_pixels(args.max_pixels)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    plan = batch.make_plan(args.inputs, args.output, args.scale, args.format, args.suffix, args.recursive,
                           args.overwrite, args.skip_existing, shard=(rank, world))
    clips = [job for job in plan.jobs if batch.is_video(job[0])]
    plan.jobs = [job for job in plan.jobs if not batch.is_video(job[0])]
    if clips and args.ensemble:
        print("note: --ensemble applies to images; clips are upscaled without it", file=sys.stderr)
    if world > 1:
        print(f"rank {rank} of {world}: {len(plan.jobs)} images to upscale" + (f", a share of {len(clips)} clips" if clips else ""))
    upscaled = _upscale_clips(args, clips, plan.failed, (rank, world))
    if clips and not plan.jobs and not plan.failed and not plan.skipped:
        if rank == 0:
            print(f"{upscaled} upscaled, 0 skipped")
        return
    batch.run(plan, _upscaler(args) if plan.jobs else None, args.format, args.quality, upscaled)


# ---- video: clips found by the upscale command go through a2n.video, one after another


def _upscale_clips(args: argparse.Namespace, clips: list, failed: list, shard: tuple[int, int]) -> int:
    """Upscale each (source, target) clip with a2n.video; failures go into failed; returns how many were written."""
    if not clips:
        return 0
    from a2n import batch, video

    model = _load_model(args)
    done = 0
    for source, target in clips:
        if not batch.is_video(target):
            failed.append((str(source), f"{target}: a clip needs a video output name (.mp4, .mkv, .mov, .webm, ...)"))
            continue
        try:
            written = video.upscale_video(source, target, model, backend=args.backend, precision=args.precision, tile=args.tile,
                                          max_memory=args.max_memory, codec=args.codec, crf=args.crf, preset=args.preset,
                                          overwrite=args.overwrite, resume=args.resume, progress=None, shard=shard)
        except A2NError as exc:
            failed.append((str(source), str(exc)))
            continue
        except MemoryError:
            failed.append((str(source), "out of memory; pass a smaller --max-memory or --tile"))
            continue
        if written is not None:
            print(f"{source} -> {target}")
            done += 1
    return done


def _add_video_options(p: argparse.ArgumentParser) -> None:
    """The options that apply to clips only."""
    g = p.add_argument_group("video (clips: mp4, mkv, mov, webm, avi, ...; needs the video extra)")
    g.add_argument("--codec", metavar="NAME", help="video codec: libx264 (default), libx265, libvpx-vp9, libsvtav1, ffv1 (lossless), ...")
    g.add_argument("--crf", type=int, metavar="N", help="constant quality, lower is better (default per codec: libx264 18, libx265 20, VP9 24, SVT-AV1 26)")
    g.add_argument("--preset", metavar="NAME", help="encoder speed preset (default: medium for libx264 and libx265, 6 for libsvtav1)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted clip from its last finished segment")


# ---- end of video


def _upscaler(args: argparse.Namespace):
    """The picture upscaler for the options: straight from the cached export when an earlier run
    recorded one for these weights and options (no torch import), else the torch model (always with --ensemble)."""
    from functools import partial

    from a2n.backends import express

    weights = Path(args.weights) if args.weights else shipped_weights_path(args.scale, args.variant)
    key = None
    if args.backend != "torch" and args.tile is None and not args.ensemble and weights is not None and weights.is_file():
        key = express.express_key(weights, args.scale, args.variant, args.backend, args.precision, args.threads)
        fast = express.express_upscaler(key, args.scale, _slow_path(args, key), args.max_memory)
        if fast is not None:
            return fast
    from a2n.inference import upscale_picture

    model = _load_model(args)
    if key is not None:
        express.remember_express(key, model, args.backend, args.precision)
    return partial(upscale_picture, model, tile=args.tile, max_memory=args.max_memory, progress=None,
                   backend=args.backend, precision=args.precision, ensemble=args.ensemble)


def _slow_path(args: argparse.Namespace, key: str):
    """An RGB upscaler on the torch model, loaded on first use: the express path's fallback for big images.

    Its first image records what it learned (auto's backend for tiles), so later runs stay torch-free.
    """
    loaded: list = []

    def upscale_rgb(rgb):
        from a2n.backends import express
        from a2n.inference import upscale_array

        first = not loaded
        if first:
            loaded.append(_load_model(args))
        out = upscale_array(loaded[0], rgb, None, args.max_memory, None, args.backend, args.precision)
        if first:
            express.remember_express(key, loaded[0], args.backend, args.precision)
        return out

    return upscale_rgb


def _load_model(args: argparse.Namespace):
    import torch

    from a2n.inference import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_model(args.scale, args.variant, args.weights)


def _add_upscale_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upscale", help="super-resolve images, video clips, folders or glob patterns (exact tiling for any size)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image and video files, folders and glob patterns")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder (created when missing), or a file name for one input; default: next to each input")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    p.add_argument("--weights", help="weights file (.safetensors, .pt, .pth); default: the shipped weights")
    p.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    p.add_argument("--format", choices=("png", "jpg", "webp", "tiff", "bmp"), help="output format; default: the input's")
    p.add_argument("--quality", type=int, default=95, choices=range(1, 101), metavar="Q", help="JPEG and WebP quality, 1..100 (default 95)")
    p.add_argument("--suffix", metavar="S", help="added to output names (default _x<scale>)")
    p.add_argument("--recursive", action="store_true", help="also take images in subfolders (mirrored under -o)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    existing.add_argument("--skip-existing", action="store_true", help="leave images whose output exists alone")
    p.add_argument("--tile", type=int, metavar="N", help="tile side in input pixels; default: chosen from --max-memory (same output for any N)")
    p.add_argument("--max-memory", type=float, metavar="GB", help="memory budget in GiB; default: half of the memory available")
    p.add_argument("--max-pixels", type=int, metavar="N", help="refuse input images with more pixels (default: Pillow's decompression-bomb limit, about 89 million)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: all cores)")
    from a2n.backends import DEFAULT_BACKEND, DEFAULT_PRECISION

    _add_backend_options(p, DEFAULT_BACKEND, DEFAULT_PRECISION)  # the Python API's and the server's defaults too
    _add_ensemble_option(p, "images only, not clips")
    _add_video_options(p)
    p.set_defaults(func=cmd_upscale)


def _add_backend_options(p: argparse.ArgumentParser, backend: str = "torch", precision: str = "fp32") -> None:
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "openvino"), default=backend,
                   help="where the model runs (big images: tiles on the same runtime at the same precision); auto: the "
                        f"fastest here, measured once per machine and weights (default {backend})")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"), default=precision,
                   help="compute precision; auto: the fastest that costs at most 0.02 dB PSNR on a ground-truth check "
                        "(bf16 only on CPUs with native bf16); int8: OpenVINO on the quantized file shipped with the weights "
                        f"or made by `a2n export --precision int8`, its tiles on the INT8 stages made with it (default {precision})")


def _add_ensemble_option(p: argparse.ArgumentParser, note: str = "") -> None:
    """--ensemble: A2N+, the self-ensemble of the 8 flips and rotations."""
    p.add_argument("--ensemble", action="store_true",
                   help="A2N+: average the outputs for the 8 flips and rotations of each image (a little more accurate; "
                        f"takes 8x the time{'; ' + note if note else ''})")


def cmd_export(args: argparse.Namespace) -> None:
    from a2n.backends import BackendError, export
    from a2n.inference import load_model

    if args.precision == "int8":
        from a2n.backends.quantize import quantize

        if args.format != "openvino" or not args.calibration:
            raise BackendError("INT8 export is for OpenVINO and needs photos to calibrate on: "
                               "a2n export --format openvino --precision int8 --calibration DIR ...")
        path, drop = quantize(load_model(args.scale, args.variant, args.weights), args.calibration, args.output, args.max_drop)
        print(f"wrote {path} (x{args.scale} INT8, dynamic height and width; {drop:+.3f} dB below fp32 on held-out crops "
              f"of the calibration photos); --precision int8 now finds it for these weights")
        return
    if args.calibration:
        raise BackendError("--calibration is for --precision int8")
    path, diff = export(load_model(args.scale, args.variant, args.weights), args.format, args.output)
    print(f"wrote {path} (x{args.scale}, dynamic height and width; max abs diff vs torch {diff:.1e})")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the model to ONNX or OpenVINO IR (dynamic size), checked against torch")
    p.add_argument("--format", choices=("onnx", "openvino"), required=True)
    p.add_argument("--scale", type=int, choices=(2, 3, 4), required=True)
    p.add_argument("--weights", help="weights file (.safetensors, .pt, .pth); default: the shipped weights")
    p.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write (.onnx; for openvino PATH.xml and PATH.bin)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: quantize with NNCF for OpenVINO (pip install 'a2n[int8]'), calibrated on --calibration; "
                        "also kept in the cache folder, where --precision int8 finds it (default fp32)")
    p.add_argument("--calibration", metavar="DIR", action="append",
                   help="int8: a folder of photos like the training data, repeatable (at least 4 photos, a quarter "
                        "held out to check the loss); minutes of work")
    p.add_argument("--max-drop", type=float, default=0.05, metavar="DB",
                   help="int8: the most PSNR the held-out crops may lose; layers go back to float until it holds (default 0.05)")
    p.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from a2n.server import create_app, parse_weights
    except ImportError as exc:
        raise UserError(f"a2n serve needs the serve extra ({exc.name} is missing): pip install 'a2n[serve]'") from exc
    limits = {"max_upload_bytes": round(args.max_upload_mb * 2**20) if args.max_upload_mb is not None else None,
              "max_pixels": args.max_pixels, "workers": args.workers, "queue": args.queue}
    app = create_app(parse_weights(args.weights), args.variant, **{k: v for k, v in limits.items() if v is not None})
    uvicorn.run(app, host=args.host, port=args.port)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="web page and HTTP API for upscaling on this computer (needs the serve extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--weights", action="append", default=[], metavar="S=FILE", help="weights for scale S, repeatable (e.g. 4=best.safetensors); default: the shipped weights")
    p.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    p.add_argument("--max-upload-mb", type=float, metavar="MB", help="largest accepted upload in MiB (default 20)")
    p.add_argument("--max-pixels", type=int, metavar="N", help="largest accepted input image in pixels (default 4,000,000)")
    p.add_argument("--workers", type=int, metavar="N", help="images upscaled at the same time (default 1)")
    p.add_argument("--queue", type=int, metavar="N", help="images waiting beyond those; more get 503 with Retry-After (default 4)")
    p.set_defaults(func=cmd_serve)


def _analysis_model(args: argparse.Namespace) -> tuple:
    """The model of an `analyze` command, a title naming it, and the metadata of its numbers."""
    from a2n.analysis import pyplot
    from a2n.weights import build_model

    pyplot()  # figures need matplotlib: say so before minutes of work, not after
    model = build_model(args.scale, args.variant, args.weights)
    source = args.weights or f"shipped {args.variant} x{args.scale} weights"
    return model, f"{Path(source).name}, {args.variant} x{args.scale}", {"weights": source, "scale": args.scale, "variant": args.variant}


def _analysis_write(args: argparse.Namespace, stem: str, result: dict, plot, title: str, summary: dict) -> None:
    """Write an analysis's figure and numbers into --out and name the files."""
    from a2n.analysis import write_numbers

    files = [plot(result, Path(args.out) / f"{stem}.png", title)] + write_numbers(args.out, stem, result["rows"], summary)
    print("wrote " + ", ".join(str(f) for f in files))


def cmd_analyze_heatmap(args: argparse.Namespace) -> None:
    from a2n import analysis, io

    image = io.read_rgb8(args.image)
    model, title, meta = _analysis_model(args)
    result = analysis.heatmap(model, image, args.channel)
    extremes = {k: result[k] for k in ("channel", "most_enhanced_block", "most_suppressed_block")}
    _analysis_write(args, f"heatmap_{Path(args.image).stem}", result, analysis.plot_heatmap,
                    f"Attention masks per block: {Path(args.image).name}, {title}", {**meta, "image": args.image, **extremes})


def cmd_analyze_highpass(args: argparse.Namespace) -> None:
    from a2n import analysis

    pairs = analysis.load_pairs(args.data, args.scale, args.limit)
    model, title, meta = _analysis_model(args)
    result = analysis.highpass_study(model, pairs, args.sigma)
    name = Path(args.data).resolve().name
    summary = {**meta, "data": args.data, **{k: v for k, v in result.items() if k != "rows"}}
    _analysis_write(args, f"highpass_{name}", result, analysis.plot_highpass,
                    f"Attention vs high-pass of the block input: {name}, {title}", summary)


def cmd_analyze_ablate(args: argparse.Namespace) -> None:
    from a2n import analysis

    pairs = analysis.load_pairs(args.data, args.scale, args.limit)
    model, title, meta = _analysis_model(args)
    result = analysis.ablation(model, pairs)
    name = Path(args.data).resolve().name
    summary = {**meta, "data": args.data, **{k: v for k, v in result.items() if k != "rows"}}
    _analysis_write(args, f"ablation_{name}", result, analysis.plot_ablation,
                    f"Attention dropout: {name}, {title} (unmodified {result['psnr']:.3f} dB / {result['ssim']:.4f})", summary)


def cmd_analyze_branch_weights(args: argparse.Namespace) -> None:
    from a2n import analysis

    pairs = analysis.load_pairs(args.data, args.scale, args.limit)
    model, title, meta = _analysis_model(args)
    result = analysis.branch_weights(model, pairs)
    name = Path(args.data).resolve().name
    summary = {**meta, "data": args.data, **{k: v for k, v in result.items() if k != "rows"}}
    _analysis_write(args, f"branch_weights_{name}", result, analysis.plot_branch_weights,
                    f"pi_attn per block over {len(pairs)} images: {name}, {title}", summary)
    print(analysis.describe_adm(result))


def cmd_analyze_lam(args: argparse.Namespace) -> None:
    from contextlib import nullcontext

    from a2n import analysis, io

    window = analysis.parse_window(args.window)
    image = io.read_rgb8(args.image)
    if args.force_attn is not None and not 0.0 <= args.force_attn <= 1.0:
        raise UserError(f"--force-attn must lie in 0..1 (0 turns attention off), got {args.force_attn}")
    model, title, meta = _analysis_model(args)
    forced = args.force_attn is not None
    crop_note = {}
    if args.crop is not None:
        image, window, (x0, y0) = analysis.crop_around(image, window, args.scale, args.crop)
        crop_note = {"crop": f"{x0},{y0},{image.shape[1]},{image.shape[0]}", "crop_note": (
            "LAM ran on this crop of the input (x, y, width, height in input pixels) and the window is given in the "
            "crop's output; the ADMs pool over the crop, not the whole image, so pi_attn differs from a full-image run")}
        print(f"LAM on a {image.shape[1]}x{image.shape[0]} crop at input ({x0}, {y0}); window {','.join(map(str, window))} "
              "in the crop's output. Note: the ADMs pool over the crop, so their pi_attn differs from a full-image run.")
    elif image.shape[0] * image.shape[1] > 96 * 96:
        print(f"note: LAM on the whole {image.shape[1]}x{image.shape[0]} input; --crop 24 runs on the part within 24 input "
              "pixels of the window, several times faster", file=sys.stderr)
    with analysis.forced_attention(model, range(len(model.blocks)), args.force_attn) if forced else nullcontext():
        result = analysis.lam(model, image, window, args.sigma, args.steps, progress=True)
    suffix = f", pi_attn forced to {args.force_attn:g}" if forced else ""
    suffix += f", crop {crop_note['crop']} of the input" if crop_note else ""
    _analysis_write(args, f"lam_{Path(args.image).stem}", result, analysis.plot_lam,
                    f"Local Attribution Map: {Path(args.image).name}, {title}{suffix}",
                    {**meta, "image": args.image, "force_attn": args.force_attn, **result["rows"][0], **crop_note})


def _add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    """The `analyze` command group: heatmap, highpass, ablate, branch-weights, lam."""
    p = sub.add_parser("analyze", help="attention analysis figures and numbers (heatmap, highpass, ablate, branch-weights, lam)")
    group = p.add_subparsers(dest="analysis", required=True, parser_class=Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", help="weights file (.safetensors, .pt, .pth); default: the shipped weights")
    common.add_argument("--scale", type=int, choices=(2, 3, 4), required=True)
    common.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    common.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG figure and the CSV/JSON numbers")
    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("--data", required=True, metavar="DIR", help="benchmark folder with HR/ and LR_bicubic/X<S>/")
    dataset.add_argument("--limit", type=int, metavar="N", help="use only the first N images (by name)")

    q = group.add_parser("heatmap", parents=[common], help="attention mask of every block beside its input features")
    q.add_argument("image", help="LR input image")
    q.add_argument("--channel", type=int, help="show this mask channel instead of the mean over channels")
    q.set_defaults(func=cmd_analyze_heatmap)

    q = group.add_parser("highpass", parents=[common, dataset], help="correlation of each block's mask with the high-pass of its input")
    q.add_argument("--sigma", type=float, default=1.0, help="high-pass = x - GaussianBlur(x, sigma), in LR pixels (default 1)")
    q.set_defaults(func=cmd_analyze_highpass)

    q = group.add_parser("ablate", parents=[common, dataset], help="attention dropout: PSNR/SSIM with pi_attn forced to 0 and 1")
    q.set_defaults(func=cmd_analyze_ablate)

    q = group.add_parser("branch-weights", parents=[common, dataset], help="distribution of pi_attn per block over images")
    q.set_defaults(func=cmd_analyze_branch_weights)

    q = group.add_parser("lam", parents=[common], help="Local Attribution Map of an output window and its diffusion index")
    q.add_argument("image", help="LR input image (keep it small, e.g. 64 to 128 pixels: cost grows with its area)")
    q.add_argument("--window", required=True, metavar="X,Y,SIZE", help="output window: top-left corner and side, in output pixels")
    q.add_argument("--steps", type=int, default=50, help="integration steps along the blur path (default 50)")
    q.add_argument("--sigma", type=float, default=5.0, help="Gaussian blur of the path's baseline, in input pixels (default 5)")
    q.add_argument("--force-attn", type=float, metavar="P", help="fix pi_attn of every block to P (0: attention off)")
    q.add_argument("--crop", type=int, metavar="MARGIN", help="run on the part of the input within MARGIN input pixels of "
                   "the window (much faster on big inputs; the ADMs then pool over the crop, so pi_attn differs)")
    q.set_defaults(func=cmd_analyze_lam)


def _existing_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such folder")
    return p


def build_parser() -> Parser:
    parser = Parser(prog="a2n", description="A2N image super-resolution (Attention in Attention Network).")
    parser.add_argument("--version", action="version", version=f"a2n {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("info", help="parameter count and multiply-adds")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    p.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    p.add_argument("--weights", nargs="?", const="", metavar="FILE",
                   help="also describe a weights file (no FILE: the shipped one): metadata and whether its ADMs are live")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("degrade", help="make MATLAB-bicubic LR images <name>x<S>.png from HR images")
    p.add_argument("hr_dir")
    p.add_argument("out_dir")
    p.add_argument("--scale", type=int, required=True, choices=range(2, 9), metavar="{2..8}")
    p.add_argument("--overwrite", action="store_true", help="replace existing LR files")
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("evaluate", help="PSNR/SSIM (Y channel, MATLAB conventions) on benchmark folders")
    p.add_argument("--data", action="append", required=True, metavar="DIR", help="folder with HR/ and LR_bicubic/X<S>/ (repeatable)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), required=True)
    p.add_argument("--weights", help="weights file (.safetensors, .pt, .pth); default: the shipped weights")
    p.add_argument("--variant", choices=("a2n", "a2n-m", "additive"), default="a2n")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--save-images", metavar="DIR", help="write the super-resolved images here")
    p.add_argument("--bicubic-only", action="store_true", help="score only the bicubic baseline")
    p.add_argument("--tile", type=int, metavar="N", help="run the model in tiles of N LR pixels (the path of images too big for "
                   "one forward): exact at fp32, and its cost against the whole fp32 image is printed")
    _add_backend_options(p)
    _add_ensemble_option(p, "the row is labelled a2n+")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train A2N from a YAML config (torchrun for data-parallel)")
    p.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/a2n_x2.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config entries")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out_dir>/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw loss and validation-PSNR curves of training runs to PNG (several runs: one figure)")
    p.add_argument("run_dir", nargs="+")
    p.add_argument("-o", "--output", metavar="PNG", help="default: <first run_dir>/curves.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("convert", help="rewrite a weights file for another pixel range (0..1 or 0..255), exactly")
    p.add_argument("input", help="weights file (.safetensors, .pt, .pth)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--pixel-range", type=float, default=255.0, help="pixel range of the new file: 255 (default, the official convention) or 1")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="needed only when the file does not say whether it is x2 or x3")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_convert)

    _add_analyze_parser(sub)
    _add_upscale_parser(sub)
    _add_export_parser(sub)
    _add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except A2NError as exc:
        print(f"a2n {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"a2n {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

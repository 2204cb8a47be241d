"""Where the forward runs: torch, ONNX Runtime or OpenVINO, in fp32, bf16 or fp16.

The model is exported once to ONNX with dynamic height and width (`a2n export`, or on first use
into the cache folder, keyed by the weights), and the other runtimes load that file. An image too
large for the memory budget goes through the exact tiled path (a2n.tiling), whose stages (head,
each block, tail) are exported the same way and run on the backend asked for, in fp32 so that
tiling stays exact everywhere (`get_stages`). `auto` times every combination this CPU supports
once, keeps the fastest whose output is within 45 dB PSNR of the fp32 forward, and caches the
choice per machine and weights; it times the tiled path apart (`choose_tiled`), since a backend
fastest on a whole image is not always fastest on tiles.

Importing torch takes over a second, so once `a2n upscale` has run a weights file on ONNX Runtime
or OpenVINO, it records that in the cache (express.json), and later runs with the same file and
options go straight from the cached export to the runtime without importing torch at all
(`express_upscaler`); an image too large for one forward takes the exact tiled path on the
exported stages, also without torch once they have been exported.
"""

from __future__ import annotations

from a2n import A2NError

import copy
import hashlib
import json
import math
import os
import platform
import sys
import threading
import time
import weakref
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from a2n import memory, pixels, tiling

if TYPE_CHECKING:
    import torch

    from a2n.io import Picture
    from a2n.model import A2N

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")
DEFAULT_BACKEND = "auto"  # a2n.upscale, a2n upscale and the server; evaluate stays on torch fp32 (machine-independent figures)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
FORMATS: tuple[str, ...] = ("onnx", "openvino")
MIN_FIDELITY_DB = 45.0
PREFER_MARGIN = 0.1  # on tiles, auto keeps its whole-image backend unless another is 10% faster
EXPORT_TOLERANCE = 1e-4
OPSET = 17
PROBE_SIZE = 64  # LR side of the image auto times and scores each candidate on
TILED_PROBE_SIZE, TILED_PROBE_TILE = 256, tiling.MAX_TILE  # the same for the tiled path: 4 tiles of the largest size
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
OV_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}

Runner = Callable[["torch.Tensor"], "torch.Tensor"]
Forward = Callable[..., np.ndarray]  # float32 arrays in the graph's input order -> its first output
Outputs = Callable[..., list[np.ndarray]]  # the same -> all of its outputs


class BackendError(A2NError):
    """A backend or precision that is unknown, not installed, or not supported by this machine."""


class ExportError(A2NError):
    """An export whose output differs from the torch forward, or a path it cannot write."""


def cache_dir() -> Path:
    """The folder for exported models and the auto choice: $A2N_CACHE_DIR or ~/.cache/a2n."""
    return Path(os.environ.get("A2N_CACHE_DIR") or Path.home() / ".cache" / "a2n")


def weights_key(model: A2N) -> str:
    """A short hash of the model's scale, variant, pixel range and weights."""
    h = hashlib.sha256(f"{model.scale} {model.variant} {model.pixel_range}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_onnx(model: A2N, path: str | os.PathLike) -> Path:
    """Write the whole-image forward as ONNX (fp32, input `lr` 1x3xHxW in 0..1, dynamic H and W)."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shadow = copy.deepcopy(model).cpu().float().eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            shadow, (torch.rand(1, 3, 16, 16),), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["lr"], output_names=["sr"],
            dynamic_axes={"lr": {2: "height", 3: "width"}, "sr": {2: "out_height", 3: "out_width"}},
        )
    os.replace(tmp, path)
    return path


_core: Any = None
_core_lock = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO Core, made on first use: OpenVINO wants one per application, and
    a new Core per model (the tiled path compiles 18) crashed the test suite's process every time."""
    global _core
    ov = _import("openvino")  # says which extra to install when it is missing
    with _core_lock:
        if _core is None:
            # pybind11 sets up its numpy bindings on the first array OpenVINO converts; two threads doing
            # that at once (the tiled path's streams, or two server requests) deadlock in a quarter to half
            # of fresh processes, so it is done here, on one thread, before anything can run
            ov.Type.f32.to_dtype()
            _core = ov.Core()
        return _core


def export_openvino(model: A2N, path: str | os.PathLike) -> Path:
    """Write the whole-image forward as OpenVINO IR (path.xml and path.bin, fp32 weights)."""
    ov = _import("openvino")
    path = Path(path).with_suffix(".xml")
    onnx_path = export_onnx(model, path.with_suffix(".onnx"))
    ov.save_model(openvino_core().read_model(str(onnx_path)), str(path), compress_to_fp16=False)
    onnx_path.unlink()
    return path


def export(model: A2N, fmt: str, path: str | os.PathLike) -> tuple[Path, float]:
    """Export to onnx or openvino and check it against torch; returns the file and the max abs diff."""
    if fmt not in FORMATS:
        raise BackendError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = export_onnx(model, path) if fmt == "onnx" else export_openvino(model, path)
    diff = verify(model, out)
    if diff > EXPORT_TOLERANCE:
        raise ExportError(f"{out}: the exported model differs from torch by {diff:.2e} (more than {EXPORT_TOLERANCE:g})")
    return out, diff


def verify(model: A2N, path: str | os.PathLike, sizes: tuple[tuple[int, int], ...] = ((24, 20), (13, 31))) -> float:
    """Max abs difference (0..1 scale) between an exported file and the torch forward, over several sizes."""
    import torch

    path = Path(path)
    runner = openvino_runner(path, "fp32") if path.suffix == ".xml" else onnxruntime_runner(path, "fp32")
    ref = torch_runner(model, "fp32")
    gen = torch.Generator().manual_seed(0)
    return max(float((runner(x) - ref(x)).abs().max()) for x in (torch.rand(1, 3, h, w, generator=gen) for h, w in sizes))


def _import(name: str):
    extra = "openvino" if name == "openvino" else "onnx"
    try:
        return __import__(name)
    except ImportError as exc:
        raise BackendError(f"the {name} backend is not installed: pip install 'a2n[{extra}]'") from exc


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it torch emulates bf16, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def torch_runner(model: A2N, precision: str) -> Runner:
    """The eager torch forward, channels_last, with weights cast to the precision."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    device = next(model.parameters()).device

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
        return net(x).float().contiguous()

    return run


def onnxruntime_outputs(path: Path, precision: str, threads: int) -> Outputs:
    """An ONNX Runtime CPU session on the exported file (fp32 only: its CPU kernels have no bf16/fp16 convs)."""
    ort = _import("onnxruntime")
    if precision != "fp32":
        raise BackendError(f"onnxruntime runs fp32 only on a CPU, not {precision}; use --backend openvino or torch")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # the tiled path keeps 18 sessions: arenas would each hold a tile's peak
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(None, dict(zip(names, xs)))


def onnxruntime_forward(path: Path, precision: str, threads: int) -> Forward:
    """onnxruntime_outputs, first output only (the whole-image forward has one)."""
    run = onnxruntime_outputs(path, precision, threads)
    return lambda *xs: run(*xs)[0]


def openvino_config(precision: str, threads: int) -> dict:
    """Compile options for OpenVINO on the CPU at precision; refuses a precision the CPU lacks."""
    if OV_CAPABILITY[precision] not in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise BackendError(f"this CPU has no {precision} support in OpenVINO; use --precision fp32")
    return {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY", "CPU_RUNTIME_CACHE_CAPACITY": 0}  # no kernels kept per input shape


def openvino_forward(path: Path, precision: str, threads: int) -> Forward:
    """An OpenVINO CPU model compiled from the exported file at the precision, for any input size."""
    core = openvino_core()
    config = {**openvino_config(precision, threads), "CACHE_DIR": str(cache_dir() / "openvino")}  # compiled once, reloaded after
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)

    def run(*xs: np.ndarray) -> np.ndarray:
        request = compiled.create_infer_request()
        return request.infer(dict(enumerate(xs)), share_inputs=True)[0]

    return run


class OpenVINOStage:
    """One stage of the tiled path on OpenVINO, compiled for each input shape it meets.

    Windows have one shape per image (tiling.grow), and a model compiled for a static shape runs
    faster than a dynamic one; its infer requests are kept and reused (thread-safe), so that a call
    allocates nothing. The last KEEP_SHAPES shapes stay compiled. With streams > 1 the threads are
    split between that many streams, so that as many calls from different threads run at once, each
    on its own threads.
    """

    KEEP_SHAPES = 2

    def __init__(self, path: Path, threads: int, streams: int = 1) -> None:
        self.path, self.config = path, {**openvino_config("fp32", threads), "NUM_STREAMS": streams}
        self.compiled: dict[tuple, tuple[Any, list]] = {}  # shapes -> (compiled model, idle requests), oldest first
        self.lock = threading.Lock()

    def _compile(self, shapes: tuple) -> Any:
        core = openvino_core()
        model = core.read_model(str(self.path))
        model.reshape({port.get_any_name(): list(shape) for port, shape in zip(model.inputs, shapes)})
        return core.compile_model(model, "CPU", self.config)

    def __call__(self, *xs: np.ndarray) -> list[np.ndarray]:
        shapes = tuple(x.shape for x in xs)
        with self.lock:
            if shapes not in self.compiled:
                while len(self.compiled) >= self.KEEP_SHAPES:
                    del self.compiled[next(iter(self.compiled))]
                self.compiled[shapes] = (self._compile(shapes), [])
            compiled, idle = self.compiled[shapes]
            request = idle.pop() if idle else compiled.create_infer_request()
        outputs = request.infer(dict(enumerate(xs)), share_inputs=True).to_tuple()  # copies: the request is reused
        with self.lock:
            idle.append(request)
        return list(outputs)


def _torch_wrapped(forward: Forward) -> Runner:
    import torch

    return lambda x: torch.from_numpy(forward(x.detach().cpu().float().contiguous().numpy()))


def onnxruntime_runner(path: Path, precision: str) -> Runner:
    """onnxruntime_forward on torch tensors, with torch's thread count."""
    import torch

    return _torch_wrapped(onnxruntime_forward(path, precision, torch.get_num_threads()))


def openvino_runner(path: Path, precision: str) -> Runner:
    """openvino_forward on torch tensors, with torch's thread count."""
    import torch

    return _torch_wrapped(openvino_forward(path, precision, torch.get_num_threads()))


def cached_onnx(model: A2N) -> Path:
    """The model's ONNX file in the cache folder, exported (and verified) on first use."""
    path = cache_dir() / f"a2n_x{model.scale}_{weights_key(model)}.onnx"
    if not path.is_file():
        export_onnx(model, path)
    return path


STAGES_FORMAT = 3  # stages.json's format: 2 since the head and the blocks sum the next entry themselves, 3 channels-last maps


def export_stages(model: A2N, folder: str | os.PathLike) -> Path:
    """Write the stages of the tiled forward as ONNX (fp32, dynamic height and width) into a folder.

    head.onnx (lr, rows, cols -> fea, sum), block00.onnx .. (part, pooled, rows, cols -> part, sum;
    the last block has no rows, cols or sum) and tail.onnx (lr, trunk -> sr); sum is the next block's
    entry summed over the rows x cols masks (model.entry_sum). Images are 1 x 3 x H x W, feature
    maps (fea, part, out, trunk) channels-last, 1 x H x W x C (a2n.model says why, above HeadStage).
    """
    import shutil
    import warnings

    import torch

    from a2n.model import BlockStage, HeadStage, TailStage

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shadow = copy.deepcopy(model).cpu().float().eval()
    nf, n = shadow.conv_first.out_channels, len(shadow.blocks)
    image, maps = {2: "height", 3: "width"}, {1: "height", 2: "width"}
    spatial = {"rows": {0: "height"}, "cols": {0: "width"}}
    x, fea, masks = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16, nf), (torch.ones(16), torch.ones(16))
    graphs = [(HeadStage(shadow), (x, *masks), "head", ["lr", "rows", "cols"], ["fea", "sum"], {"lr": image, "fea": maps, **spatial}),
              (TailStage(shadow), (x, fea), "tail", ["lr", "trunk"], ["sr"], {"lr": image, "trunk": maps, "sr": image})]
    for k, block in enumerate(shadow.blocks):
        if k + 1 < n:
            graphs.append((BlockStage(block, shadow.blocks[k + 1]), (fea, torch.rand(1, nf), *masks), f"block{k:02d}",
                           ["part", "pooled", "rows", "cols"], ["out", "sum"], {"part": maps, "out": maps, **spatial}))
        else:
            graphs.append((BlockStage(block), (fea, torch.rand(1, nf)), f"block{k:02d}", ["part", "pooled"], ["out"],
                           {"part": maps, "out": maps}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, inputs, name, input_names, output_names, axes in graphs:
            torch.onnx.export(module, inputs, str(tmp / f"{name}.onnx"), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
    meta = {"format": STAGES_FORMAT, "scale": shadow.scale, "channels": nf, "blocks": n}
    (tmp / "stages.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process exported the same weights first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stages_ready(folder: Path) -> bool:
    """Whether folder holds stages that this version exports (older formats are remade)."""
    return read_table(folder / "stages.json").get("format") == STAGES_FORMAT


def _summed(y: torch.Tensor) -> np.ndarray:
    import torch

    return y.sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()


class TorchStages:
    """The tiled forward's stages on the torch model itself (on its device), in fp32, one tile at a time."""

    parallel = 1

    def __init__(self, model: A2N) -> None:
        self.model = model
        self.scale, self.channels, self.blocks = model.scale, model.conv_first.out_channels, len(model.blocks)
        self.device = next(model.parameters()).device

    def prepare(self, x: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)

    def features(self, height: int, width: int) -> torch.Tensor:
        import torch

        return torch.empty(1, self.channels, height, width, device=self.device, memory_format=torch.channels_last)

    def head(self, x: torch.Tensor, inner: tiling.Box) -> tuple[torch.Tensor, np.ndarray]:
        fea = self.model.head(x)[:, :, inner[0], inner[1]]
        return fea, _summed(self.model.blocks[0].entry(fea))

    def block(self, k: int, part: torch.Tensor, pooled: np.ndarray, inner: tiling.Box) -> tuple[torch.Tensor, np.ndarray | None]:
        import torch

        block = self.model.blocks[k]
        out = block.mix(part, block.entry(part), torch.from_numpy(pooled).to(self.device))[:, :, inner[0], inner[1]]
        return out, _summed(self.model.blocks[k + 1].entry(out)) if k + 1 < self.blocks else None

    def tail(self, x: torch.Tensor, fea: torch.Tensor) -> torch.Tensor:
        return self.model.tail(x, self.model.head(x), fea)

    def to_numpy(self, sr: torch.Tensor) -> np.ndarray:
        return sr.detach().float().cpu().numpy()


def _masks(shape: tuple[int, ...], inner: tiling.Box) -> tuple[np.ndarray, np.ndarray]:
    """0/1 float32 row and column masks of a window of shape (..., H, W) that select its inner box."""
    rows, cols = np.zeros(shape[-2], np.float32), np.zeros(shape[-1], np.float32)
    rows[inner[0]], cols[inner[1]] = 1, 1
    return rows, cols


class ExportedStages:
    """The tiled forward's stages from export_stages, on ONNX Runtime or OpenVINO in fp32 (numpy in and out).

    Feature maps are channels-last in memory, as the exported stages take them, and indexed 1 x C x H x W
    here (a transposed view). OpenVINO runs memory.TILES_IN_FLIGHT tiles at once on as many streams
    (given two threads or more); ONNX Runtime as many on one session, each call on its share of the
    threads.
    """

    def __init__(self, folder: Path, backend: str, threads: int) -> None:
        meta = json.loads((folder / "stages.json").read_text())
        self.scale, self.channels, self.blocks = meta["scale"], meta["channels"], meta["blocks"]
        self.parallel = min(memory.TILES_IN_FLIGHT[backend], threads)
        if backend == "onnxruntime":
            def make(path: Path) -> Outputs:  # a session runs calls from several threads at once, each on its own threads
                return onnxruntime_outputs(path, "fp32", threads // self.parallel)
        else:
            def make(path: Path) -> Outputs:
                return OpenVINOStage(path, threads, self.parallel)
        self._head = make(folder / "head.onnx")
        self._tail = make(folder / "tail.onnx")
        self._blocks = [make(folder / f"block{k:02d}.onnx") for k in range(self.blocks)]

    def _send(self, fea: np.ndarray) -> np.ndarray:
        """A feature window as the runtime takes it: contiguous and channels-last."""
        return np.ascontiguousarray(fea.transpose(0, 2, 3, 1))

    def _received(self, fea: np.ndarray, inner: tiling.Box) -> np.ndarray:
        """The inner box of a channels-last feature window from the runtime, as a 1 x C x h x w view."""
        return fea.transpose(0, 3, 1, 2)[:, :, inner[0], inner[1]]

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x

    def features(self, height: int, width: int) -> np.ndarray:
        return np.empty((1, height, width, self.channels), dtype=np.float32).transpose(0, 3, 1, 2)

    def head(self, x: np.ndarray, inner: tiling.Box) -> tuple[np.ndarray, np.ndarray]:
        fea, summed = self._head(np.ascontiguousarray(x), *_masks(x.shape, inner))
        return self._received(fea, inner), summed[0].astype(np.float64)

    def block(self, k: int, part: np.ndarray, pooled: np.ndarray, inner: tiling.Box) -> tuple[np.ndarray, np.ndarray | None]:
        if k + 1 < self.blocks:
            out, summed = self._blocks[k](self._send(part), pooled, *_masks(part.shape, inner))
            return self._received(out, inner), summed[0].astype(np.float64)
        (out,) = self._blocks[k](self._send(part), pooled)
        return self._received(out, inner), None

    def tail(self, x: np.ndarray, fea: np.ndarray) -> np.ndarray:
        return self._tail(np.ascontiguousarray(x), self._send(fea))[0]

    def to_numpy(self, sr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(sr)


def stages_folder(model: A2N) -> Path:
    """Where the model's exported stages live in the cache folder."""
    return cache_dir() / f"a2n_x{model.scale}_{weights_key(model)}_stages{STAGES_FORMAT}"


_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_stages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # auto's pick per model, so a folder looks it up once
_tiled_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the same for the tiled path


def resolve(model: A2N, backend: str, precision: str) -> tuple[str, str]:
    """The (backend, precision) a request runs on: auto becomes the cached fastest choice."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if backend == "auto":
        if model not in _choices:
            _choices[model] = choose(model)
        return _choices[model]
    return backend, precision


def resolve_tiled(model: A2N, backend: str) -> str:
    """The backend the tiled path runs on: backend itself, or for auto the fastest on tiles (choose_tiled)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if model not in _tiled_choices:
        _tiled_choices[model] = choose_tiled(model)
    return _tiled_choices[model]


def get_runner(model: A2N, backend: str = "torch", precision: str = "fp32") -> Runner:
    """The whole-image forward of model on backend at precision (auto: the cached fastest choice)."""
    backend, precision = resolve(model, backend, precision)
    made = _runners.setdefault(model, {})
    if (backend, precision) not in made:
        if backend == "torch":
            made[(backend, precision)] = torch_runner(model, precision)
        elif backend == "onnxruntime":
            made[(backend, precision)] = onnxruntime_runner(cached_onnx(model), precision)
        else:
            made[(backend, precision)] = openvino_runner(cached_onnx(model), precision)
    return made[(backend, precision)]


def get_stages(model: A2N, backend: str = "torch") -> TorchStages | ExportedStages:
    """The tiled forward's stages of model on backend, always fp32 (auto: the fastest on tiles, resolve_tiled)."""
    import torch

    backend = resolve_tiled(model, backend)
    made = _stages.setdefault(model, {})
    if backend not in made:
        if backend == "torch":
            made[backend] = TorchStages(model)
        else:
            folder = stages_folder(model)
            if not stages_ready(folder):
                export_stages(model, folder)
            made[backend] = ExportedStages(folder, backend, torch.get_num_threads())
    return made[backend]


def fidelity_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of out against the fp32 reference, both on the 0..1 scale (inf when equal)."""
    mse = float((out.float() - ref.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def candidates() -> list[tuple[str, str]]:
    """The (backend, precision) pairs worth timing here: installed, and supported by the CPU in hardware."""
    found = [("torch", "fp32")] + ([("torch", "bf16")] if cpu_has_native_bf16() else [])
    try:
        _import("onnxruntime")
        found.append(("onnxruntime", "fp32"))
    except BackendError:
        pass
    try:
        caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        found += [("openvino", p) for p in PRECISIONS if OV_CAPABILITY[p] in caps]
    except BackendError:
        pass
    return found


def probe_image(size: int) -> torch.Tensor:
    """A natural image crop (the packaged sample) as 1x3xSxS in 0..1, or seeded noise without it."""
    from importlib import resources

    import torch

    sample = Path(str(resources.files("a2n"))) / "samples" / "village.png"
    if sample.is_file():
        from PIL import Image

        rgb = np.asarray(Image.open(sample).convert("RGB"))[:size, :size]
        if rgb.shape[:2] == (size, size):
            return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def measure(model: A2N, pairs: list[tuple[str, str]], size: int | None = None, repeat: int = 2) -> list[dict]:
    """Seconds (best of repeat, after a warm-up) and fidelity in dB vs torch fp32 for each pair, on a PROBE_SIZE image by default."""
    x = probe_image(size or PROBE_SIZE)
    ref = torch_runner(model, "fp32")(x)
    rows = []
    for backend, precision in pairs:
        try:
            run = get_runner(model, backend, precision)
            out = run(x)
            seconds = min(_timed(run, x) for _ in range(repeat))
            rows.append({"backend": backend, "precision": precision, "seconds": seconds, "fidelity_db": fidelity_db(out, ref)})
        except A2NError as exc:
            rows.append({"backend": backend, "precision": precision, "error": str(exc)})
    return rows


def measure_tiled(model: A2N, names: list[str], size: int | None = None, tile: int | None = None, repeat: int = 2) -> list[dict]:
    """Seconds of the tiled path and fidelity in dB vs torch, per backend: after a run that compiles the tile
    shape, the best of repeat rounds that time every backend in turn, so that a slow spell of the machine
    does not fall on one backend alone."""
    import torch

    size, tile = size or TILED_PROBE_SIZE, tile or TILED_PROBE_TILE
    x = probe_image(size).numpy()
    scale = model.scale
    outputs, stages, errors = {}, {}, {}
    with torch.inference_mode():
        for name in ["torch"] + [n for n in names if n != "torch"]:
            try:
                stages[name] = get_stages(model, name)
                outputs[name] = np.empty((size * scale, size * scale, 3), np.float32)
                tiling.run_tiled(stages[name], x, outputs[name], tile)
            except A2NError as exc:
                errors[name] = str(exc)
                stages.pop(name, None)
        seconds: dict[str, float] = {}
        for _ in range(repeat):
            for name, stage in stages.items():
                start = time.perf_counter()
                tiling.run_tiled(stage, x, outputs[name], tile)
                seconds[name] = min(seconds.get(name, math.inf), time.perf_counter() - start)
    ref = torch.from_numpy(outputs["torch"])
    rows = [{"backend": n, "error": errors[n]} if n in errors else
            {"backend": n, "seconds": seconds[n], "fidelity_db": fidelity_db(torch.from_numpy(outputs[n]), ref)} for n in names]
    return rows


def _timed(run: Runner, x: torch.Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def _machine_text() -> str:
    """CPU model and flags and the installed versions of torch and the runtimes (read without importing them)."""
    try:
        info = "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines(True) if line.startswith(("model name", "flags")))
    except OSError:
        info = platform.processor()
    versions = []
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            versions.append(metadata.version(name))
        except metadata.PackageNotFoundError:
            versions.append("-")
    return f"{info}|{'|'.join(versions)}"


def machine_key() -> str:
    """What the auto choice depends on: CPU, library versions, torch's thread count."""
    import torch

    return hashlib.sha256(f"{_machine_text()}|{torch.get_num_threads()}".encode()).hexdigest()[:16]


def choose(model: A2N) -> tuple[str, str]:
    """The fastest (backend, precision) with fidelity >= 45 dB for this machine and weights, measured once and cached."""
    pairs = candidates()
    if len(pairs) == 1:  # nothing to choose between (a plain install without native bf16)
        return pairs[0]
    entry = cached_fastest(f"{machine_key()}-{weights_key(model)}", f"{len(pairs)} backends", lambda: measure(model, pairs))
    return entry["backend"], entry["precision"]


def cached_fastest(key: str, what: str, timings: Callable[[], list[dict]], prefer: str | None = None) -> dict:
    """auto.json's entry for key: the fastest row of timings() with fidelity >= 45 dB, measured on first use only.

    The prefer backend's row wins unless another is PREFER_MARGIN faster: a short probe on a noisy
    machine should not flip a choice that a closer look would not."""
    path = cache_dir() / "auto.json"
    table = read_table(path)
    if key not in table:
        print(f"a2n: timing {what} once for this machine and weights (kept in {path})", file=sys.stderr)
        rows = timings()
        good = [r for r in rows if "seconds" in r and r["fidelity_db"] >= MIN_FIDELITY_DB]
        best = min(good, key=lambda r: r["seconds"])
        best = next((r for r in good if r["backend"] == prefer and r["seconds"] <= best["seconds"] * (1 + PREFER_MARGIN)), best)
        table[key] = {**{k: best[k] for k in ("backend", "precision") if k in best}, "measured": rows}
        write_table(path, table)
    return table[key]


def read_table(path: Path) -> dict:
    """A JSON table of the cache folder ({} when absent or unreadable: it is remade)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_table(path: Path, table: dict) -> None:
    """Replace a JSON table of the cache folder atomically (concurrent runs never read half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)


def tiled_key(model: A2N) -> str:
    """The auto.json key of the tiled path's choice: machine, weights, the stages' format and the tiles each
    backend runs at once (a change to either is timed again)."""
    in_flight = "".join(str(memory.TILES_IN_FLIGHT[b]) for b in sorted(memory.TILES_IN_FLIGHT))
    return f"{machine_key()}-{weights_key(model)}-tiled{STAGES_FORMAT}-{in_flight}"


def choose_tiled(model: A2N) -> str:
    """The fastest fp32 backend for the tiled path on this machine and weights, measured once and cached.

    Tiles do not run at the speed of a whole image (per-call costs, other shapes), and the backend
    fastest on one is not always fastest on the other, so auto times the tiled path itself.
    """
    names = [b for b, p in candidates() if p == "fp32"]
    if len(names) == 1:
        return names[0]
    whole = _choices.get(model, (None,))[0]  # the whole-image choice, when made: kept for tiles unless clearly beaten
    entry = cached_fastest(tiled_key(model), f"the tiled path on {len(names)} backends", lambda: measure_tiled(model, names), whole)
    return entry["backend"]


def known_tiled_choice(model: A2N) -> str | None:
    """auto's backend for the tiled path if it was measured already (never measures)."""
    if model in _tiled_choices:
        return _tiled_choices[model]
    return read_table(cache_dir() / "auto.json").get(tiled_key(model), {}).get("backend")


def express_key(weights: Path, scale: int, variant: str, backend: str, precision: str, threads: int | None) -> str:
    """What an express entry depends on: the weights file's bytes, the options asked for, the machine.

    OMP_NUM_THREADS counts too: without --threads it sets torch's thread count, which the entry keeps.
    """
    h = hashlib.sha256(weights.read_bytes())
    h.update(f"|{scale}|{variant}|{backend}|{precision}|{threads}|{os.environ.get('OMP_NUM_THREADS')}|{_machine_text()}".encode())
    return h.hexdigest()[:16]


def remember_express(key: str, model: A2N, backend: str, precision: str) -> None:
    """Record that this request runs model on a runtime other than torch, so that later runs can skip torch.

    The tiled path's backend is recorded too once known (auto measures it on the first big image).
    """
    import torch

    tiled = backend if backend != "auto" else known_tiled_choice(model)
    backend, precision = resolve(model, backend, precision)
    if backend == "torch":
        return
    get_runner(model, backend, precision)  # raises here, before anything is recorded, when the pair cannot run
    entry = {"backend": backend, "precision": precision, "onnx": str(cached_onnx(model)), "stages": str(stages_folder(model)),
             "tiled": tiled, "threads": torch.get_num_threads()}
    path = cache_dir() / "express.json"
    table = read_table(path)
    if table.get(key) != entry:
        table[key] = entry
        write_table(path, table)


def express_upscaler(key: str, scale: int, slow_path: Callable[[np.ndarray], np.ndarray],
                     max_memory: float | None = None) -> Callable[[Picture], Picture] | None:
    """A picture upscaler on the runtime recorded for key, made without importing torch; None when nothing is recorded.

    Images whose whole-image forward would exceed the memory budget take the exact tiled path on
    the exported stages when the tiled path's backend is recorded as one of the runtimes, and
    slow_path (the torch model, loaded then) otherwise.
    """
    entry = read_table(cache_dir() / "express.json").get(key)
    if entry is None:
        return None
    onnx = Path(entry["onnx"])
    if not onnx.is_file():
        return None
    make = onnxruntime_forward if entry["backend"] == "onnxruntime" else openvino_forward
    try:
        forward = make(onnx, entry["precision"], entry["threads"])
    except BackendError:  # the runtime was uninstalled since: take the torch path, which chooses again
        return None
    stages: list[ExportedStages] = []

    def upscale_rgb(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if memory.forward_bytes(h, w, scale, entry["backend"]) <= memory.budget_bytes(max_memory):
            return pixels.from_planes(forward(pixels.to_planes(rgb)), rgb.dtype)
        folder, tiled = Path(entry.get("stages", "")), entry.get("tiled")
        if tiled not in ("onnxruntime", "openvino") or not stages_ready(folder):
            return slow_path(rgb)
        if not stages:
            stages.append(ExportedStages(folder, tiled, entry["threads"]))
        tile = tiling.plan_tile(h, w, scale, stages[0].channels, max_memory, rgb.dtype.itemsize, tiled, whole=False)
        out = np.empty((h * scale, w * scale, 3), dtype=rgb.dtype)
        tiling.run_tiled(stages[0], pixels.to_planes(rgb), out, tile, None)
        return out

    return lambda picture: pixels.upscale_picture(picture, scale, upscale_rgb)

"""The three runtimes a forward can run on (torch, ONNX Runtime, OpenVINO) and what each runs here.

torch runs the model itself; ONNX Runtime and OpenVINO run its export (a2n.backends.export) and
are imported only when used, each with the extra that installs it named in the error when missing.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from a2n import A2NError
from a2n.backends import cpu
from a2n.backends.cache import cache_dir

if TYPE_CHECKING:
    import torch

    from a2n.model import A2N

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: the quantized IR; what it keeps in float stays fp32
OV_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}

Runner = Callable[["torch.Tensor"], "torch.Tensor"]
Forward = Callable[..., np.ndarray]  # float32 arrays in the graph's input order -> its first output
Outputs = Callable[..., list[np.ndarray]]  # the same -> its outputs; into=(arrays,): the first ones written there instead


class BackendError(A2NError):
    """A backend or precision that is unknown, not installed, or not supported by this machine."""


def require(name: str) -> Any:
    """Import onnxruntime or openvino, or say which extra installs it."""
    extra = "openvino" if name == "openvino" else "onnx"
    try:
        return __import__(name)
    except ImportError as exc:
        raise BackendError(f"the {name} backend is not installed: pip install 'a2n[{extra}]'") from exc


_core: Any = None
_core_lock = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO Core, made on first use: OpenVINO wants one per application, and
    a new Core per model (the tiled path compiles 18) crashed the test suite's process every time."""
    global _core
    ov = require("openvino")
    with _core_lock:
        if _core is None:
            # pybind11 sets up its numpy bindings on the first array OpenVINO converts; two threads doing
            # that at once (the tiled path's streams, or two server requests) deadlock in a quarter to half
            # of fresh processes, so it is done here, on one thread, before anything can run
            ov.Type.f32.to_dtype()
            _core = ov.Core()
        return _core


def openvino_precisions() -> list[str]:
    """The precisions OpenVINO's CPU plugin runs here; bf16 only where the CPU has it natively (cpu.native_bf16);
    int8 runs a quantized file (a2n.backends.quantize), not the export."""
    caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return [p for p in ("fp32", "bf16", "fp16", "int8") if OV_CAPABILITY[p] in caps and (p != "bf16" or cpu.native_bf16())]


def candidates() -> list[tuple[str, str]]:
    """The (backend, precision) pairs worth timing here: installed, and computed in hardware by this CPU
    (int8 is added per model by auto, where the model has an INT8 file)."""
    found = [("torch", "fp32")] + ([("torch", "bf16")] if cpu.native_bf16() else [])
    try:
        require("onnxruntime")
        found.append(("onnxruntime", "fp32"))
    except BackendError:
        pass
    try:
        found += [("openvino", p) for p in openvino_precisions() if p != "int8"]
    except BackendError:
        pass
    return found


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (torch runs no int8: that is OpenVINO's)."""
    import torch

    if precision == "int8":
        raise BackendError("int8 runs on OpenVINO only; use --backend openvino (or auto)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def torch_runner(model: A2N, precision: str) -> Runner:
    """The eager torch forward, channels_last, with weights cast to the precision."""
    import torch

    dtype = torch_dtype(precision)
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    device = next(model.parameters()).device

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
        return net(x).float().contiguous()

    return run


def onnxruntime_outputs(path: Path, precision: str, threads: int) -> Outputs:
    """An ONNX Runtime CPU session on the exported file (fp32 only: its CPU kernels have no bf16/fp16 convs)."""
    ort = require("onnxruntime")
    if precision != "fp32":
        raise BackendError(f"onnxruntime runs fp32 only on a CPU, not {precision}; use --backend openvino"
                           + ("" if precision == "int8" else " or torch"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # the tiled path keeps 18 sessions: arenas would each hold a tile's peak
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*xs: np.ndarray, into: tuple[np.ndarray, ...] = ()) -> list[np.ndarray]:
        ys = session.run(None, dict(zip(names, xs)))
        for y, target in zip(ys, into):
            target[...] = y
        return ys[len(into):]

    return run


def onnxruntime_forward(path: Path, precision: str, threads: int) -> Forward:
    """onnxruntime_outputs, first output only (the whole-image forward has one)."""
    run = onnxruntime_outputs(path, precision, threads)
    return lambda *xs: run(*xs)[0]


def openvino_config(precision: str, threads: int) -> dict:
    """Compile options for OpenVINO on the CPU at precision; refuses a precision the CPU lacks."""
    if precision not in openvino_precisions():
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
    """One stage of the tiled path on OpenVINO at a precision, compiled for each input shape it meets.

    Windows have one shape per image (tiling.grow), and a model compiled for a static shape runs
    faster than a dynamic one; its infer requests are kept and reused (thread-safe), so that a call
    allocates nothing. The last KEEP_SHAPES shapes stay compiled. With streams > 1 the threads are
    split between that many streams, so that as many calls from different threads run at once, each
    on its own threads. bf16_ports names the inputs and outputs that take and give bf16 (as uint16 arrays of
    its bits) instead of float32: a feature map that the stages compute in bf16 anyway then moves between
    them in half the bytes, with no conversion at either end.
    """

    KEEP_SHAPES = 2

    def __init__(self, path: Path, threads: int, streams: int = 1, precision: str = "fp32", bf16_ports: frozenset[str] = frozenset()) -> None:
        self.path, self.config = path, {**openvino_config(precision, threads), "NUM_STREAMS": streams}
        self.bf16_ports = bf16_ports
        self.compiled: dict[tuple, tuple[Any, dict]] = {}  # shapes -> (compiled model, idle requests by len(into)), oldest first
        self.lock = threading.Lock()

    def _compile(self, shapes: tuple) -> Any:
        core = openvino_core()
        model = core.read_model(str(self.path))
        model.reshape({port.get_any_name(): list(shape) for port, shape in zip(model.inputs, shapes)})
        if self.bf16_ports:
            ov = require("openvino")
            from openvino.preprocess import PrePostProcessor

            steps = PrePostProcessor(model)
            for ports, step in ((model.inputs, steps.input), (model.outputs, steps.output)):
                for port in ports:
                    if port.get_any_name() in self.bf16_ports:
                        step(port.get_any_name()).tensor().set_element_type(ov.Type.bf16)
            model = steps.build()
        return core.compile_model(model, "CPU", self.config)

    def __call__(self, *xs: np.ndarray, into: tuple[np.ndarray, ...] = ()) -> list[np.ndarray]:
        """The stage's outputs for inputs xs; the first len(into) are written in place into those arrays (contiguous,
        of the outputs' shapes) and left out of the list, the rest are copies."""
        return self.start(*xs, into=into)()

    def start(self, *xs: np.ndarray, into: tuple[np.ndarray, ...] = ()) -> Callable[[], list[np.ndarray]]:
        """Start the stage on xs and return at once; the function returned waits for it and gives what __call__ would.

        The inputs and `into` must stay as they are until then. Started calls queue for the streams, so that one
        thread keeps them all busy: the tiled path runs its tiles this way (a thread pool calling infer was 1.14x
        slower on a block pass, bench/RESULTS.md).
        """
        shapes = tuple(x.shape for x in xs)
        with self.lock:
            if shapes not in self.compiled:
                while len(self.compiled) >= self.KEEP_SHAPES:
                    del self.compiled[next(iter(self.compiled))]
                self.compiled[shapes] = (self._compile(shapes), {})
            compiled, idle = self.compiled[shapes]
            kept = idle.setdefault(len(into), [])  # a request given output arrays keeps them: not for calls without
            request = kept.pop() if kept else compiled.create_infer_request()
        ov = require("openvino")

        def tensor(x: np.ndarray) -> Any:  # shares x's memory; uint16: bf16 bits
            return ov.Tensor(x, x.shape, ov.Type.bf16) if x.dtype == np.uint16 else ov.Tensor(x, shared_memory=True)

        for i, target in enumerate(into):
            request.set_output_tensor(i, tensor(target))
        for i, x in enumerate(xs):
            request.set_input_tensor(i, tensor(x))
        request.start_async()
        held = (xs, into)

        def wait() -> list[np.ndarray]:
            nonlocal held  # the arrays the request reads and writes live until it has ended
            request.wait()
            held = ()
            rest = [self._copied(request.get_output_tensor(i), port) for i, port in enumerate(compiled.outputs) if i >= len(into)]
            with self.lock:
                kept.append(request)
            return rest

        return wait

    def _copied(self, tensor: Any, port: Any) -> np.ndarray:
        """An output of a request (reused later) as a numpy copy; bf16 ports as uint16 bits."""
        y = tensor.data
        return (y.view(np.uint16) if port.get_any_name() in self.bf16_ports else y).copy()


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

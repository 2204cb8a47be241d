"""The cache folder of exports and auto's measurements, and the keys its entries are filed under."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from a2n.model import A2N


def cache_dir() -> Path:
    """The folder for exported models and the auto choice: $A2N_CACHE_DIR or ~/.cache/a2n."""
    return Path(os.environ.get("A2N_CACHE_DIR") or Path.home() / ".cache" / "a2n")


def file_key(path: Path) -> str | None:
    """A short hash of a file's bytes (None if there is no file): an entry keyed by it is made again when the file is
    remade, as a new release's INT8 file would be."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def weights_key(model: A2N) -> str:
    """A short hash of the model's scale, variant, pixel range and weights."""
    h = hashlib.sha256(f"{model.scale} {model.variant} {model.pixel_range}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def machine_text() -> str:
    """CPU model and flags, the installed versions of torch and the runtimes (read without importing them),
    and any capability override (a2n.backends.cpu)."""
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
    return f"{info}|{'|'.join(versions)}|{os.environ.get('A2N_NATIVE_BF16', '')}"


def machine_key() -> str:
    """What the auto choice depends on: CPU, library versions, torch's thread count."""
    import torch

    return hashlib.sha256(f"{machine_text()}|{torch.get_num_threads()}".encode()).hexdigest()[:16]


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

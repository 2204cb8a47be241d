"""Shared test fixtures: where the read-only ../shared data lives, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARK = SHARED / "data" / "benchmark"
OFFICIAL = SHARED / "reference" / "official_weights"


def need(path: Path) -> Path:
    """Skip the calling test, naming the path, when read-only shared data is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's shared data (../shared)")
    return path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One torch thread for tiny tensors (thread hand-offs cost more than they give), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh cache folder (tmp_path/cache: exports, INT8 files and auto's choice start empty) and one torch thread."""
    monkeypatch.setenv("A2N_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exported models and the auto backend choice go to a folder of this run, never to ~/.cache."""
    import os

    before = os.environ.get("A2N_CACHE_DIR")
    os.environ["A2N_CACHE_DIR"] = str(tmp_path_factory.mktemp("a2n_cache"))
    yield Path(os.environ["A2N_CACHE_DIR"])
    if before is None:
        del os.environ["A2N_CACHE_DIR"]
    else:
        os.environ["A2N_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded random x2 model saved as safetensors (modules that need other weights define their own)."""
    from a2n.model import A2N
    from a2n.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_x2.safetensors"
    save_weights(A2N(scale=2), path)
    return str(path)


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Free what each test leaves (compiled OpenVINO models, ONNX Runtime sessions) right after it, so that
    native runtimes are released where they were used, not inside some later test's garbage collection."""
    yield
    import gc

    gc.collect()

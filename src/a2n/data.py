"""Training data: HR images with MATLAB-bicubic LR partners, random patches and the 8 dihedral augmentations.

Every sample is a pure function of (seed, sample index), so a run that resumes at step k sees
exactly the patches an uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from a2n import A2NError, io
from a2n.resize import imresize, modcrop


class DataError(A2NError):
    """Training data that cannot be used: an empty folder, no usable images."""


def _cached_resize(img: np.ndarray, path: Path, factor: float, tag: str, cache_dir: Path | None) -> np.ndarray:
    """MATLAB-bicubic resize of an image by `factor`, cached on disk by the image's content and `tag`."""
    if cache_dir is None:
        return imresize(img, factor)
    key = hashlib.sha1(img.tobytes() + str(img.shape).encode()).hexdigest()[:16]
    cached = cache_dir / f"{path.stem}_{key}_{tag}.npy"
    if cached.is_file():
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass
    out = imresize(img, factor)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out)
    os.replace(tmp, cached)
    return out


class PatchDataset(Dataset):
    """Random (LR, HR) patch pairs from folders of HR images, indexed by a global sample number.

    LR images come from `lr_dirs` (paired folders, `<name>x<scale>.png` or `<name>.png`) when given,
    otherwise from our MATLAB-exact resize (cached in `cache_dir`). Unreadable images and images
    smaller than one patch are skipped with a warning; `skipped` lists them. `downscale` adds, for
    each factor, a copy of every HR image shrunk by it (with its own LR), as VDSR, DRRN and IDN
    enlarged the 291-image set; copies smaller than a patch are left out without a warning.
    """

    def __init__(
        self,
        hr_dirs: Sequence[str | os.PathLike],
        scale: int,
        patch_size: int,
        seed: int = 0,
        lr_dirs: Sequence[str | os.PathLike] | None = None,
        cache_dir: str | os.PathLike | None = None,
        augment: bool = True,
        downscale: Sequence[float] = (),
    ) -> None:
        self.scale, self.patch_size, self.seed, self.augment = scale, patch_size, seed, augment
        self.images: list[tuple[np.ndarray, np.ndarray]] = []
        self.names: list[str] = []
        self.skipped: list[str] = []
        if lr_dirs is not None and len(lr_dirs) != len(hr_dirs):
            raise DataError("lr_dirs must list one LR folder per HR folder")
        cache = Path(cache_dir) if cache_dir is not None else None
        for i, hr_dir in enumerate(hr_dirs):
            hr_dir = Path(hr_dir)
            if not hr_dir.is_dir():
                raise DataError(f"{hr_dir}: training folder does not exist")
            files = io.list_images(hr_dir)
            if not files:
                raise DataError(f"{hr_dir}: no training images (PNG, JPEG, WebP, TIFF, BMP) in this folder")
            for path in files:
                try:
                    full = io.read_rgb8(path)
                    hr = modcrop(full, scale)
                    if lr_dirs is not None:
                        lr = self._paired_lr(Path(lr_dirs[i]), path, hr)
                    else:
                        lr = _cached_resize(hr, path, 1.0 / scale, f"x{scale}", cache)
                except A2NError as exc:
                    self._skip(str(path), f"{exc}")
                    continue
                if min(lr.shape[:2]) < patch_size:
                    self._skip(str(path), f"LR size {lr.shape[1]}x{lr.shape[0]} is smaller than the patch {patch_size}")
                    continue
                self.images.append((lr, hr))
                self.names.append(str(path))
                for factor in downscale:
                    small = modcrop(_cached_resize(full, path, factor, f"s{factor:g}", cache), scale)
                    if min(small.shape[:2]) >= patch_size * scale:
                        self.images.append((_cached_resize(small, path, 1.0 / scale, f"x{scale}", cache), small))
                        self.names.append(f"{path} x{factor:g}")
        if not self.images:
            raise DataError(f"no usable training images in {', '.join(map(str, hr_dirs))}")

    def _paired_lr(self, lr_dir: Path, hr_path: Path, hr: np.ndarray) -> np.ndarray:
        for name in (f"{hr_path.stem}x{self.scale}{hr_path.suffix}", hr_path.name, f"{hr_path.stem}x{self.scale}.png"):
            if (lr_dir / name).is_file():
                lr = io.read_rgb8(lr_dir / name)
                if lr.shape[0] * self.scale != hr.shape[0] or lr.shape[1] * self.scale != hr.shape[1]:
                    raise DataError(f"{lr_dir / name}: LR size does not match its HR image at x{self.scale}")
                return lr
        raise DataError(f"{hr_path}: no LR partner in {lr_dir}")

    def _skip(self, name: str, why: str) -> None:
        warnings.warn(f"skipping training image {name}: {why}", stacklevel=3)
        self.skipped.append(name)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        lr, hr = self.images[int(rng.integers(len(self.images)))]
        p, s = self.patch_size, self.scale
        y = int(rng.integers(lr.shape[0] - p + 1))
        x = int(rng.integers(lr.shape[1] - p + 1))
        lr_patch = lr[y : y + p, x : x + p]
        hr_patch = hr[y * s : (y + p) * s, x * s : (x + p) * s]
        if self.augment:
            k = int(rng.integers(8))
            lr_patch, hr_patch = dihedral(lr_patch, k), dihedral(hr_patch, k)
        return _chw(lr_patch), _chw(hr_patch)


class ScaleCycle(Dataset):
    """Joint multi-scale training data: step k takes its whole batch from datasets[k % n] (one per scale)."""

    def __init__(self, datasets: Sequence[PatchDataset], global_batch: int) -> None:
        self.datasets, self.global_batch = list(datasets), global_batch

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.datasets[(index // self.global_batch) % len(self.datasets)][index]


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an HxWxC image (k in 0..7; 0 is the identity)."""
    if k & 4:
        img = img.transpose(1, 0, 2)
    if k & 2:
        img = img[::-1]
    if k & 1:
        img = img[:, ::-1]
    return img


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


class StepBatchSampler(Sampler[list[int]]):
    """Batches of global sample indices from `start_step` on: rank r takes its own slice of each step.

    Step s covers samples s*B .. s*B+B-1 of the global batch B, split evenly across ranks, so the
    same config trains on the same samples whatever the number of processes.
    """

    def __init__(self, global_batch: int, start_step: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise DataError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
        self.global_batch, self.start_step = global_batch, start_step
        self.local = global_batch // world_size
        self.offset = rank * self.local

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            base = step * self.global_batch + self.offset
            yield list(range(base, base + self.local))
            step += 1

    def __len__(self) -> int:
        return 2**62

"""a2n: image super-resolution with the Attention in Attention Network (A2N)."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


class A2NError(Exception):
    """Base of the errors a user can fix; the command line prints them as one line."""


def shipped_weights_path(scale: int, variant: str = "a2n") -> Path | None:
    """The weights this package ships for (scale, variant), or None when there are none."""
    path = Path(__file__).parent / "pretrained" / f"{variant}_x{scale}.safetensors"
    return path if path.is_file() else None


def __getattr__(name: str):
    """a2n.load_model, a2n.upscale and a2n.upscale_video, imported on first use so that `import a2n` stays light (no torch)."""
    if name in ("load_model", "upscale"):
        from a2n import inference

        return getattr(inference, name)
    if name == "upscale_video":
        from a2n import video

        return video.upscale_video
    raise AttributeError(f"module 'a2n' has no attribute {name!r}")

"""`a2n serve`: a local web page and HTTP API that upscale images, with bounded work and JSON errors.

One model per scale is loaded on first use and shared by all requests. Decoding, inference and
encoding run in a thread pool, off the event loop; at most workers + queue images are accepted at
a time and the rest are answered 503 with Retry-After. The request body is capped at
max_upload_bytes while it streams in; the image is identified by its content, never by its
declared type, and its pixel count is checked before a pixel is decoded. Results are encoded in
memory; the framework spools uploads over 1 MiB to an unnamed temporary file that it closes.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Mapping, Sequence

import swagger_ui_bundle
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from a2n import A2NError, __version__, io
from a2n.inference import load_model, upscale_picture
from a2n.model import A2N
from a2n.weights import shipped_weights_path

STATIC = Path(__file__).parent / "static"
SCALES = (2, 3, 4)
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 4_000_000
DEFAULT_WORKERS = 1
DEFAULT_QUEUE = 4
RETRY_AFTER_S = 5
QUALITY = 95

router = APIRouter()


class ServeError(A2NError):
    """A server set-up that cannot work: a bad --weights entry or a limit that is not positive."""


class Scale(IntEnum):
    """The upscaling factors A2N is built for."""

    x2 = 2
    x3 = 3
    x4 = 4


class BodyLimit:
    """ASGI middleware: request bodies over max_bytes, declared or streamed, end in a 413 JSON answer."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = 0
        too_large = HTTPException(413, f"the upload is larger than this server's limit of {self.max_bytes:,} bytes; send a smaller file")

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


class Upscaler:
    """The models (one per scale, loaded on first use) and the bounded thread pool that runs them."""

    def __init__(self, weights: Mapping[int, Path], variant: str, workers: int, queue: int, shipped: bool = True) -> None:
        self.weights = dict(weights)
        self.shipped = shipped
        self.variant = variant
        self.capacity = workers + queue
        self.busy = 0
        self.models: dict[int, A2N] = {}
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="a2n-upscale")
        self._loading = threading.Lock()

    def scales(self) -> list[int]:
        """The scales this server can run: weights given, or shipped with the package."""
        return [s for s in SCALES if s in self.weights or (self.shipped and shipped_weights_path(s, self.variant) is not None)]

    def model(self, scale: int) -> A2N:
        """The shared model for scale, loaded on first use (in a worker thread)."""
        with self._loading:
            if scale not in self.models:
                self.models[scale] = load_model(scale, self.variant, self.weights.get(scale))
            return self.models[scale]

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) in the pool; 503 with Retry-After when workers + queue jobs are already in."""
        if self.busy >= self.capacity:
            raise HTTPException(
                503,
                f"the server is busy with {self.busy} images (its limit); try again in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.busy += 1
        loop = asyncio.get_running_loop()
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self.busy -= 1


def parse_weights(specs: Sequence[str]) -> dict[int, Path]:
    """`S=FILE` entries (from --weights) as {scale: path}."""
    weights = {}
    for spec in specs:
        scale, sep, path = spec.partition("=")
        if not sep or not scale.strip().isdigit() or not path:
            raise ServeError(f"--weights {spec}: expected SCALE=FILE, e.g. --weights 4=runs/a2n_x4/best.safetensors")
        weights[int(scale)] = Path(path)
    return weights


def create_app(
    weights: Mapping[int, str | os.PathLike] | None = None,
    variant: str = "a2n",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = DEFAULT_WORKERS,
    queue: int = DEFAULT_QUEUE,
    shipped: bool = True,
) -> FastAPI:
    """The web app (page at /, API under /api, docs at /docs); scales not in weights use the shipped weights unless shipped is False."""
    weights = {scale: Path(path) for scale, path in (weights or {}).items()}
    for scale, path in weights.items():
        if scale not in SCALES:
            raise ServeError(f"--weights {scale}={path}: the scale must be 2, 3 or 4")
        if not path.is_file():
            raise ServeError(f"--weights {scale}={path}: no such file")
    for name, value, least in (("max upload bytes", max_upload_bytes, 1), ("max pixels", max_pixels, 1), ("workers", workers, 1), ("queue", queue, 0)):
        if value < least:
            raise ServeError(f"{name} must be at least {least}, got {value}")
    upscaler = Upscaler(weights, variant, workers, queue, shipped)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        upscaler.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="a2n",
        version=__version__,
        description="Image super-resolution with A2N. POST an image to /api/upscale; the page at / does it for people.",
        lifespan=lifespan,
        docs_url=None,  # served below from the swagger-ui-bundle package, not from a CDN
    )
    app.state.upscaler = upscaler
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_pixels = max_pixels
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(A2NError, a2n_error)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    return app


@router.get("/docs", include_in_schema=False)
async def api_docs() -> HTMLResponse:
    """FastAPI's Swagger UI page, with its script and style from this server, so it works offline."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="a2n API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Every HTTP error as {"error": message}."""
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad or missing form fields as 422 with one readable line and FastAPI's details."""
    lines = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(lines), "details": jsonable_encoder(exc.errors())}, 422)


async def a2n_error(request: Request, exc: A2NError) -> JSONResponse:
    """A failure on the server's side (e.g. weights that do not load) as a 500 that says what happened."""
    return JSONResponse({"error": str(exc)}, 500)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC / "index.html")


@router.get("/api/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness, the scales on offer, the limits, and how busy the server is."""
    upscaler: Upscaler = request.app.state.upscaler
    return {
        "status": "ok",
        "version": __version__,
        "scales": upscaler.scales(),
        "loaded": sorted(upscaler.models),
        "formats": list(OUTPUT_FORMATS),
        "max_upload_bytes": request.app.state.max_upload_bytes,
        "max_pixels": request.app.state.max_pixels,
        "busy": upscaler.busy,
        "capacity": upscaler.capacity,
    }


@router.post(
    "/api/upscale",
    response_class=Response,
    responses={
        200: {"content": {media: {} for _, media in OUTPUT_FORMATS.values()}, "description": "The upscaled image."},
        413: {"description": "The upload or the image's pixel count is over the server's limit."},
        415: {"description": "The file is not a PNG, JPEG, WebP, TIFF or BMP image, or it is corrupt."},
        422: {"description": "Bad options: scale, format, or a format that cannot hold the image."},
        503: {"description": "The server is busy; retry after the Retry-After seconds."},
    },
)
async def upscale(
    request: Request,
    file: Annotated[UploadFile, File(description="The image: PNG, JPEG, WebP, TIFF or BMP (recognised by content).")],
    scale: Annotated[Scale, Form(description="Upscaling factor: 2, 3 or 4.")],
    fmt: Annotated[Literal["png", "jpeg", "webp"], Form(alias="format", description="Output format.")] = "png",
    ensemble: Annotated[bool, Form(description="A2N+: average the outputs for the 8 flips and rotations (a little more accurate, 8x the time).")] = False,
) -> Response:
    """Upscale one image and return it in the chosen format."""
    upscaler: Upscaler = request.app.state.upscaler
    factor = int(scale)
    if factor not in upscaler.scales():
        raise HTTPException(422, f"scale: this server has no weights for x{factor}; it offers {_list(upscaler.scales())} (start it with --weights {factor}=FILE)")
    data = await file.read()
    img = open_upload(data, request.app.state.max_pixels)
    pil_format, media = OUTPUT_FORMATS[fmt]
    if pil_format == "JPEG" and (img.mode in io.ALPHA_MODES or "transparency" in img.info):
        raise HTTPException(422, "format: JPEG cannot store this image's transparency; ask for png or webp")
    body = await upscaler.run(process, upscaler, img, data, factor, pil_format, ensemble)
    name = f"{_safe_stem(file.filename)}_x{factor}.{fmt}"
    return Response(body, media_type=media, headers={"Content-Disposition": f'inline; filename="{name}"'})


def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Identify an upload by its content and check its pixel count, before any pixel is decoded."""
    if not data:
        raise HTTPException(415, "the file is empty (0 bytes)")
    try:
        img = Image.open(BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError as exc:
        raise HTTPException(415, "not an image: the content is not PNG, JPEG, WebP, TIFF or BMP, whatever its name or declared type") from exc
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"the image has more pixels than this server's limit of {max_pixels:,}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(415, f"a corrupt or unsupported image ({exc})") from exc
    if img.width * img.height > max_pixels:
        raise HTTPException(413, f"the image is {img.width}x{img.height} = {img.width * img.height:,} pixels, over this server's limit of {max_pixels:,}; send a smaller image")
    return img


def process(upscaler: Upscaler, img: Image.Image, data: bytes, scale: int, fmt: str, ensemble: bool = False) -> bytes:
    """Decode, upscale (ensemble: A2N+) and encode one image (runs in a worker thread); 16-bit stays 16-bit in PNG."""
    try:
        picture = io.decode(img, data)
    except (OSError, SyntaxError, ValueError, EOFError, io.ImageReadError) as exc:
        raise HTTPException(415, f"a corrupt or truncated {img.format} image ({exc})") from exc
    return io.encode_image(upscale_picture(upscaler.model(scale), picture, ensemble=ensemble), fmt, QUALITY)


def _safe_stem(filename: str | None) -> str:
    """The upload's name without folder or extension, reduced to characters safe in a header."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename or "image").stem).strip("._")
    return stem or "image"


def _list(scales: list[int]) -> str:
    return ", ".join(f"x{s}" for s in scales) or "no scale at all"

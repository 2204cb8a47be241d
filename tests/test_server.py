"""`a2n serve`: the HTTP API with real images, its errors and limits, and a real server under load."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="a2n serve needs the serve extra: pip install -e '.[serve]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

import a2n  # noqa: E402
from a2n.cli import main  # noqa: E402
from a2n.model import A2N  # noqa: E402
from a2n.server import ServeError, create_app, parse_weights  # noqa: E402
from a2n.weights import save_weights  # noqa: E402

MAX_UPLOAD = 4000
MAX_PIXELS = 1000


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def upload(data: bytes, scale: str = "4", name: str = "photo.png", kind: str = "image/png", **fields: str) -> dict[str, Any]:
    """Keyword arguments of client.post for uploading data to /api/upscale."""
    return {"files": {"file": (name, data, kind)}, "data": {"scale": scale, **fields}}


def post(client: httpx.Client, data: bytes, **options: str) -> httpx.Response:
    return client.post("/api/upscale", **upload(data, **options))


def decoded(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(response.content)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "w_x4.safetensors"
    save_weights(A2N(4), path)
    return path


@pytest.fixture(scope="module")
def model(weights: Path) -> A2N:
    return a2n.load_model(4, weights=weights)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@contextmanager
def running(app: FastAPI) -> Iterator[httpx.Client]:
    """The app under uvicorn on a free loopback port, in a thread; yields a client for it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive()) and server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def client(weights: Path) -> Iterator[httpx.Client]:
    with running(create_app({4: weights}, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, shipped=False)) as c:
        yield c


def expected(model: A2N, data: bytes) -> np.ndarray:
    return np.asarray(a2n.upscale(Image.open(BytesIO(data)), model))


def test_upscale_returns_the_model_output_as_png(client: httpx.Client, model: A2N) -> None:
    data = encoded(rgb(12, 16))
    r = post(client, data)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'inline; filename="photo_x4.png"'
    out = decoded(r)
    assert out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, expected(model, data))


def test_ensemble_field_gives_a2n_plus(client: httpx.Client, model: A2N) -> None:
    """ensemble=true answers what a2n.upscale(..., ensemble=True) gives (A2N+); false, the default, one forward."""
    data = encoded(rgb(12, 16))
    plus, plain = post(client, data, ensemble="true"), post(client, data, ensemble="false")
    assert plus.status_code == plain.status_code == 200
    np.testing.assert_array_equal(decoded(plus), np.asarray(a2n.upscale(Image.open(BytesIO(data)), model, ensemble=True)))
    np.testing.assert_array_equal(decoded(plain), expected(model, data))
    assert not np.array_equal(decoded(plus), decoded(plain))


@pytest.mark.parametrize(("fmt", "media", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_output_formats(client: httpx.Client, fmt: str, media: str, pil_format: str) -> None:
    r = post(client, encoded(rgb(12, 16)), format=fmt)
    assert r.status_code == 200
    assert r.headers["content-type"] == media
    img = Image.open(BytesIO(r.content))
    assert (img.format, img.size) == (pil_format, (64, 48))


def test_gray_and_alpha_survive(client: httpx.Client) -> None:
    gray = encoded(rgb(12, 16)[..., 0])
    assert decoded(post(client, gray)).shape == (48, 64)
    rgba = np.dstack([rgb(12, 16), np.full((12, 16), 128, np.uint8)])
    out = decoded(post(client, encoded(rgba)))
    assert out.shape == (48, 64, 4)
    assert np.abs(out[..., 3].astype(int) - 128).max() <= 1


def test_16_bit_stays_16_bit_and_exif_orientation_is_applied(client: httpx.Client, model: A2N) -> None:
    import cv2

    gray16 = np.random.default_rng(0).integers(0, 65536, (12, 16), dtype=np.uint16)
    out = decoded(post(client, encoded(gray16)))
    assert (out.dtype, out.shape) == (np.uint16, (48, 64))
    rgb16 = np.random.default_rng(1).integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    r = post(client, cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes())
    out = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert (out.dtype, out.shape) == (np.uint16, (48, 64, 3))
    np.testing.assert_array_equal(out, a2n.upscale(rgb16, model))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    data = BytesIO()
    Image.fromarray(rgb(12, 16)).save(data, format="PNG", exif=exif)
    assert decoded(post(client, data.getvalue())).shape == (64, 48, 3)


def test_type_comes_from_the_content_not_the_declared_type(client: httpx.Client) -> None:
    r = post(client, encoded(rgb(12, 16), "JPEG"), name="notes.txt", kind="text/plain")
    assert r.status_code == 200
    assert decoded(r).shape == (48, 64, 3)
    r = post(client, b"<html>not a picture</html>", name="photo.png", kind="image/png")
    assert r.status_code == 415
    assert "not an image" in r.json()["error"]


def streamed(client: httpx.Client, request: httpx.Request) -> httpx.Response:
    """Send request's body in 1000-byte chunks without a Content-Length (chunked transfer encoding)."""
    body = request.read()
    chunks = (body[i:i + 1000] for i in range(0, len(body), 1000))
    return client.post(request.url.path, content=chunks, headers={"content-type": request.headers["content-type"]})


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("upload too large", 413, "larger than this server's limit of 4,000 bytes"),
        ("1 MB upload", 413, "larger than this server's limit of 4,000 bytes"),
        ("streamed upload too large", 413, "larger than this server's limit of 4,000 bytes"),
        ("too many pixels", 413, "40x40 = 1,600 pixels, over this server's limit of 1,000"),
        ("empty file", 415, "the file is empty"),
        ("truncated png", 415, "corrupt or truncated PNG image"),
        ("gif is not accepted", 415, "not an image"),
        ("scale 5", 422, "scale: Input should be 2, 3 or 4"),
        ("scale missing", 422, "scale: Field required"),
        ("scale without weights", 422, "no weights for x3; it offers x4"),
        ("unknown format", 422, "format: Input should be 'png', 'jpeg' or 'webp'"),
        ("jpeg with alpha", 422, "JPEG cannot store this image's transparency"),
    ],
)
def test_errors_are_json_with_a_status_and_a_reason(client: httpx.Client, case: str, status: int, message: str) -> None:
    small = encoded(rgb(12, 16))
    requests = {
        "upload too large": lambda: post(client, encoded(rgb(40, 40))),
        "1 MB upload": lambda: post(client, os.urandom(2**20)),
        "streamed upload too large": lambda: streamed(client, httpx.Request("POST", "/api/upscale", **upload(os.urandom(6000)))),
        "too many pixels": lambda: post(client, encoded(np.zeros((40, 40, 3), np.uint8))),
        "empty file": lambda: post(client, b""),
        "truncated png": lambda: post(client, small[: len(small) // 2]),
        "gif is not accepted": lambda: post(client, encoded(rgb(12, 16)[..., 0], "GIF"), kind="image/gif"),
        "scale 5": lambda: post(client, small, scale="5"),
        "scale missing": lambda: client.post("/api/upscale", files={"file": ("a.png", small, "image/png")}),
        "scale without weights": lambda: post(client, small, scale="3"),
        "unknown format": lambda: post(client, small, format="gif"),
        "jpeg with alpha": lambda: post(client, encoded(np.dstack([rgb(12, 16), rgb(12, 16, 1)[..., 0]])), format="jpeg"),
    }
    r = requests[case]()
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_weights_that_do_not_load_give_a_500_that_names_them(tmp_path: Path) -> None:
    bad = tmp_path / "broken_x4.safetensors"
    bad.write_bytes(b"not weights")
    with running(create_app({4: bad})) as c:
        r = post(c, encoded(rgb(12, 16)))
    assert r.status_code == 500
    assert str(bad) in r.json()["error"]


def test_health_reports_scales_limits_and_lazy_models(weights: Path) -> None:
    with running(create_app({4: weights}, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, workers=2, queue=3, shipped=False)) as c:
        before = c.get("/api/health").json()
        assert post(c, encoded(rgb(12, 16))).status_code == 200
        after = c.get("/api/health").json()
    assert before["status"] == "ok"
    assert before["scales"] == [4]
    assert (before["loaded"], after["loaded"]) == ([], [4])
    assert (before["max_upload_bytes"], before["max_pixels"], before["capacity"], after["busy"]) == (4000, 1000, 5, 0)


def test_openapi_describes_the_upload_form(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/upscale"]["post"]["requestBody"]["content"]
    schema = spec["components"]["schemas"][body["multipart/form-data"]["schema"]["$ref"].split("/")[-1]]
    assert set(schema["properties"]) == {"file", "scale", "format", "ensemble"}
    assert schema["properties"]["ensemble"]["default"] is False
    assert spec["components"]["schemas"]["Scale"]["enum"] == [2, 3, 4]
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_page_uses_only_bundled_assets(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"/static/app.js", "/static/style.css"} <= set(links)
    for link in links:
        assert link.startswith(("/static/", "#", "data:")), link
        if link.startswith("/static/"):
            asset = client.get(link)
            assert asset.status_code == 200
            assert "http://" not in asset.text and "https://" not in asset.text


def test_a_full_queue_answers_503_with_retry_after(weights: Path) -> None:
    app = create_app({4: weights}, workers=1, queue=0)
    data = encoded(rgb(96, 96))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a2n") as c:
            return await asyncio.gather(*[c.post("/api/upscale", **upload(data)) for _ in range(4)])

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200, 503, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "5"
            assert "busy" in r.json()["error"]
    assert app.state.upscaler.busy == 0


def test_bad_setups_are_refused_before_serving(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_weights(["2=a.pt", "4=b.safetensors"]) == {2: Path("a.pt"), 4: Path("b.safetensors")}
    for spec in (["4"], ["x4=a.pt"], ["4="]):
        with pytest.raises(ServeError, match="expected SCALE=FILE"):
            parse_weights(spec)
    with pytest.raises(ServeError, match="the scale must be 2, 3 or 4"):
        create_app({5: weights})
    with pytest.raises(ServeError, match="workers must be at least 1"):
        create_app({4: weights}, workers=0)
    assert main(["serve", "--weights", f"4={tmp_path / 'missing.safetensors'}"]) == 1
    assert "missing.safetensors: no such file" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """Resident memory of a process in bytes."""
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def open_files(pid: int) -> list[str]:
    """Targets of the process's file descriptors."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return targets


@contextmanager
def serving(tmp_path: Path, weights: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`a2n serve` in its own process on a free loopback port, with its own TMPDIR; yields (url, process, tmpdir)."""
    port = free_port()
    tmp = tmp_path / "server-tmp"
    tmp.mkdir()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "a2n", "serve", "--port", str(port), "--weights", f"4={weights}", *options],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None

    try:
        assert wait_for(up, 60) and proc.poll() is None, (tmp_path / "server.log").read_text()
        yield url, proc, tmp
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_load_of_20_concurrent_uploads(tmp_path: Path, weights: Path, model: A2N) -> None:
    images = [encoded(rgb(12, 16, seed)) for seed in range(20)]
    with serving(tmp_path, weights, "--workers", "1", "--queue", "4") as (url, proc, _):
        with httpx.Client(base_url=url, timeout=120) as c:  # the first request may time auto once (several seconds)
            assert post(c, images[0]).status_code == 200
        start = rss(proc.pid)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/api/upscale", **upload(data, name=f"i{i}.png")) for i, data in enumerate(images)])

        for _ in range(2):
            responses = asyncio.run(burst())
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 503}, codes
            assert codes.count(200) >= 5  # the first workers + queue arrivals are never refused
            for data, r in zip(images, responses):
                if r.status_code == 200:
                    out = decoded(r)
                    assert out.shape == (48, 64, 3)
                    assert np.abs(out.astype(int) - expected(model, data)).max() <= 1
                else:
                    assert r.headers["retry-after"] == "5"
        health = httpx.get(f"{url}/api/health").json()
        assert proc.poll() is None
        assert (health["status"], health["busy"]) == ("ok", 0)
        grown = rss(proc.pid) - start
        assert grown < 16 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB"


def wire(request: httpx.Request) -> bytes:
    """A request as HTTP/1.1 bytes, to send through a plain socket."""
    headers = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n{headers}\r\n".encode() + request.read()


def test_disconnected_clients_leave_no_temporary_files(tmp_path: Path, weights: Path) -> None:
    with serving(tmp_path, weights, "--max-upload-mb", "4") as (url, proc, tmp):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=120) as c:  # the first request may time auto once (several seconds)
            assert post(c, encoded(rgb(12, 16))).status_code == 200
        time.sleep(0.5)
        baseline = len(open_files(proc.pid))
        libraries = set(tmp.iterdir())  # what the runtimes keep there (ONNX Runtime writes a .ses file on import)

        def spooled() -> list[str]:
            return [f for f in open_files(proc.pid) if f.startswith(str(tmp))]

        upload_3mb = wire(httpx.Request("POST", f"{url}/api/upscale", **upload(os.urandom(3_000_000))))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(upload_3mb[:1_500_000])  # half of it, then hang up
            assert wait_for(lambda: bool(spooled())), "the server never spooled the upload to a temporary file"
        assert wait_for(lambda: not spooled() and len(open_files(proc.pid)) <= baseline), open_files(proc.pid)

        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(wire(httpx.Request("POST", f"{url}/api/upscale", **upload(encoded(rgb(128, 128))))))
            assert wait_for(lambda: httpx.get(f"{url}/api/health").json()["busy"] == 1)  # hang up while it runs
        assert wait_for(lambda: httpx.get(f"{url}/api/health").json()["busy"] == 0, 60)
        assert wait_for(lambda: len(open_files(proc.pid)) <= baseline), open_files(proc.pid)
        assert set(tmp.iterdir()) == libraries
        with httpx.Client(base_url=url, timeout=120) as c:  # the first request may time auto once (several seconds)
            assert decoded(post(c, encoded(rgb(12, 16)))).shape == (48, 64, 3)

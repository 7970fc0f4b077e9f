"""Issue 31 item 7 (and 15 for the page): the explorer's uploads are bounded in bytes while they stream, in pixels
from the header before decoding, and in images kept; Save checks a picture's pixels before decoding it; AnyUp
without weights is one line naming the flag."""
import asyncio
import base64
import io

import pytest
from PIL import Image

from densevit.apps.explore.session import Explorer
from densevit.apps.explore.web import create_app
from densevit.errors import DensevitError

pytestmark = pytest.mark.usefixtures("one_thread")

HOME = "http://127.0.0.1:7860"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def multipart(files):
    boundary = b"----densevitboundary7MA4YWxk"
    out = b""
    for name, data in files:
        out += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="' + name +
                b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n")
    return out + b"--" + boundary + b"--\r\n", "multipart/form-data; boundary=" + boundary.decode()


@pytest.fixture()
def explorer(make_extractor, golden_path, noise_pair):
    ex = Explorer(extractor=make_extractor(8), weights=str(golden_path), load_size=56, max_images=3,
                  max_upload_pixels=100_000)
    ex.add_image(noise_pair[0], "a")
    return ex


@pytest.fixture()
def client(explorer, tmp_path):
    from starlette.testclient import TestClient

    app = create_app(explorer, tmp_path / "saved", max_upload_bytes=1 << 20)
    with TestClient(app, base_url=HOME, headers={"Origin": HOME}, raise_server_exceptions=False) as c:
        yield c


def one_line_400(r) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "internal error" not in msg
    return msg


class _Streaming:
    """A request whose body arrives in 64 KiB chunks, counting what the server read."""

    def __init__(self, total: int, declared: bool) -> None:
        self.read = 0
        self.total = total
        body, kind = multipart([(b"big.png", b"\0" * total)])
        self.body = body
        from starlette.datastructures import Headers

        self.headers = Headers({"content-type": kind, **({"content-length": str(len(body))} if declared else {})})

    async def stream(self):
        for i in range(0, len(self.body), 1 << 16):
            self.read += len(self.body[i:i + (1 << 16)])
            yield self.body[i:i + (1 << 16)]


@pytest.mark.parametrize("declared", [True, False])
def test_upload_bytes_are_bounded_while_streaming(declared):
    """A 300 MB upload was read whole before it was refused; now reading stops at the bound (a declared length
    past it is refused before reading at all)."""
    from densevit.apps.explore.web import read_uploads

    req = _Streaming(8 << 20, declared)
    with pytest.raises(DensevitError, match="--max-upload-mib"):
        asyncio.run(read_uploads(req, 1 << 20))
    assert req.read <= (1 << 20) + (1 << 16)
    if declared:
        assert req.read == 0


def test_upload_past_the_bound_is_one_line_400(client, explorer):
    body, kind = multipart([(b"big.png", b"\0" * (2 << 20))])
    assert "--max-upload-mib" in one_line_400(client.post("/api/upload", content=body,
                                                          headers={"Content-Type": kind}))
    assert len(explorer.images) == 1


def test_upload_pixels_read_from_the_header(client, explorer):
    big = png_bytes(Image.new("RGB", (400, 400)))          # 160,000 pixels > 100,000 allowed, a tiny file
    body, kind = multipart([(b"wide.png", big)])
    msg = one_line_400(client.post("/api/upload", content=body, headers={"Content-Type": kind}))
    assert "wide.png" in msg and "--max-upload-pixels" in msg
    assert len(explorer.images) == 1


def test_images_kept_are_bounded(client, explorer, noise_pair):
    png = png_bytes(noise_pair[1])
    body, kind = multipart([(b"b.png", png), (b"c.png", png), (b"d.png", png)])
    res = client.post("/api/upload", content=body, headers={"Content-Type": kind}).json()
    assert res["added"] == ["b.png", "c.png"] and "--max-images" in res["errors"][0]
    assert len(explorer.images) == 3


def test_save_checks_pixels_before_decoding(client):
    """A 656 KB PNG decoded to 676 MB; a picture past the pixels a view has is refused from its header."""
    from densevit.apps.explore import web

    huge = png_bytes(Image.new("1", (8000, 8000)))       # 64 Mpixels in a small file
    url = "data:image/png;base64," + base64.b64encode(huge).decode()
    with pytest.raises(DensevitError, match="pixels"):
        web._png(url)


def test_anyup_without_weights_names_the_flag(client, monkeypatch, tmp_path):
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    r = client.post("/api/prepare", json={"settings": {"stride": 8, "load_size": 56, "layer": 11,
                                                       "upsample": "anyup"}})
    msg = one_line_400(r)
    assert "--upsample-weights" in msg and "weights=" not in msg

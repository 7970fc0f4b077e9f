"""The explorer's web layer (densevit.apps.explore.web) under hostile and bad requests, with the golden random
weights: it answers only its own page (Host and Origin checks), bad numbers, names and pictures get a 400 with a
one-line message (never a 500 or a 0-byte file), and a real server keeps answering while the model works and
stops at once on SIGTERM / Ctrl-C (a real ``densevit-explore`` on 127.0.0.1 with an ephemeral port)."""
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from densevit.apps.explore.session import Explorer
from densevit.apps.explore.web import allowed_hosts, create_app
from PIL import Image

from densevit.errors import DensevitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

HOME = "http://127.0.0.1:7860"          # the origin the test client's page comes from
SETTINGS = {"stride": 8, "load_size": 56, "layer": 11}


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def explorer(make_extractor, golden_path, noise_pair):
    ex = Explorer(extractor=make_extractor(8), weights=str(golden_path), load_size=56)
    a, b = noise_pair
    ex.add_image(a, "a")
    ex.add_image(b, "b")
    return ex


@pytest.fixture()
def client(explorer, tmp_path):
    """A test client of the explorer's app as its own page would call it (Host 127.0.0.1:7860, same Origin)."""
    from starlette.testclient import TestClient

    app = create_app(explorer, tmp_path / "saved")
    with TestClient(app, base_url=HOME, headers={"Origin": HOME}, raise_server_exceptions=False) as c:
        yield c


def one_line_400(r) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "internal error" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- Host and Origin
def test_only_its_own_host_names_are_answered(client, explorer, tmp_path):
    from starlette.testclient import TestClient

    for host in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "127.0.0.1"):
        assert client.get("/api/state", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example:7860", "localhost.evil.example"):
        r = client.get("/api/state", headers={"Host": host})          # DNS rebinding: a foreign name
        assert r.status_code == 400 and "backbone" not in r.text, host
        assert client.get("/", headers={"Host": host}).status_code == 400
    # bound to another address: that address (any port) and the loopback names; --allow-host adds names
    hosts = allowed_hosts("192.168.7.9", ["Explore.Lab"])
    assert {"192.168.7.9", "127.0.0.1", "localhost", "[::1]", "explore.lab"} <= set(hosts)
    assert "[fe80::1]" in allowed_hosts("fe80::1")
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")   # a wildcard bind: this machine's name
    with TestClient(create_app(explorer, tmp_path, hosts=hosts), base_url="http://192.168.7.9:7860") as c:
        assert c.get("/api/state").status_code == 200
        assert c.get("/api/state", headers={"Host": "explore.lab:80"}).status_code == 200
        assert c.get("/api/state", headers={"Host": "evil.example"}).status_code == 400


def test_other_pages_cannot_change_its_state(client, explorer, noise_pair):
    png = png_bytes(noise_pair[0])
    up = lambda headers: client.post("/api/upload", files={"files": ("x.png", png, "image/png")},  # noqa: E731
                                     headers=headers)
    refused = [
        {"Origin": "http://evil.example"},                             # another site's page
        {"Origin": "http://127.0.0.1:9999"},                           # another local origin (port)
        {"Origin": "http://localhost:7860"},                           # another name for it: another origin
        {"Origin": "null"},                                            # sandboxed / file:// pages
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "", "Sec-Fetch-Site": "cross-site"},                # a no-cors form post without Origin
        {"Origin": "", "Sec-Fetch-Site": "same-site"},
        {"Origin": ""},                                                # shows neither header
    ]
    for h in refused:
        client.headers.pop("Origin")                                    # exactly the headers of the case
        r = up({k: v for k, v in h.items() if v})
        client.headers["Origin"] = HOME
        assert r.status_code == 403, (h, r.status_code, r.text)
        assert r.json()["error"] and "\n" not in r.json()["error"]
        assert len(explorer.images) == 2, h                            # nothing was added
    for path, body in [("/api/prepare", {"settings": SETTINGS}), ("/api/save", {"png": "x", "mode": "pca"}),
                       ("/api/similarity", {"settings": SETTINGS, "image": 0, "x": 5, "y": 5})]:
        assert client.post(path, json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert not explorer.progress["busy"] and explorer._cache.used == 0     # no extraction was started
    # its own page: same Origin, or Sec-Fetch-Site: same-origin alone
    assert up({}).status_code == 200 and len(explorer.images) == 3
    client.headers.pop("Origin")
    assert up({"Sec-Fetch-Site": "same-origin"}).status_code == 200 and len(explorer.images) == 4
    assert client.get("/api/state", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: no change


# ---------------------------------------------------------------------------------------------- bad numbers
def post_raw(client, path, text):
    return client.post(path, content=text, headers={"Content-Type": "application/json"})


def test_bad_numbers_for_a_click_are_400(client):
    ok = client.post("/api/attention", json={"settings": SETTINGS, "image": 0, "x": 30, "y": 20, "head": "2"})
    assert ok.status_code == 200 and ok.json()["head"] == 2
    s = json.dumps(SETTINGS)
    word = {"head": "head must be", "x": "x must be", "y": "y must be", "image": "image index", "k": "top-k"}
    for field, value in [("head", '"abc"'), ("head", "NaN"), ("head", "1.5"), ("head", "6"), ("head", "-1"),
                         ("head", "true"), ("head", "[1]"), ("head", "1e400"), ("x", "NaN"), ("x", "Infinity"),
                         ("y", "1e400"), ("x", '"left"'), ("image", "1e400"), ("image", "-1"), ("image", "2"),
                         ("image", '"abc"'), ("k", "0"), ("k", "1e400"), ("k", "101"), ("k", '"abc"')]:
        body = {"image": "0", "x": "30", "y": "20", "head": '"mean"', "k": "3", field: value}
        text = "{" + f'"settings": {s}, ' + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}"
        for route in ("/api/attention", "/api/similarity"):
            if field == "head" and route == "/api/similarity":
                continue
            msg = one_line_400(post_raw(client, route, text))
            assert word[field] in msg, (route, field, value, msg)
    for settings, word in [('{"layer": 1e400}', "layer"), ('{"layer": 12}', "layer"), ('{"layer": "x"}', "layer"),
                           ('"abc"', "settings"), ('{"facet": 3}', "facet"), ('{"facet": "attn"}', "facet"),
                           ('{"bin": "yes"}', "bin"), ('{"stride": NaN}', "stride")]:
        msg = one_line_400(post_raw(client, "/api/similarity", f'{{"settings": {settings}, "image": 0, "x": 5, '
                                                               f'"y": 5}}'))
        assert word in msg, (settings, msg)
    assert "bad request" in one_line_400(post_raw(client, "/api/similarity", '{"settings": '))   # not JSON
    assert "bad request" in one_line_400(post_raw(client, "/api/similarity", "[1, 2]"))


def test_load_size_and_stride_are_bounded(client, explorer, make_extractor, golden_path):
    for load_size in (-5, 0, 7, 2000, 1025, "abc", 1.5, True):
        msg = one_line_400(client.post("/api/prepare", json={"settings": {**SETTINGS, "load_size": load_size}}))
        assert "load size" in msg, (load_size, msg)
    for stride in (3, 0, -8, 1, 16, 2.5):
        msg = one_line_400(client.post("/api/prepare", json={"settings": {**SETTINGS, "stride": stride}}))
        assert "stride" in msg and ("choose from 2, 4, 8" in msg or "whole number" in msg), (stride, msg)
    assert explorer._cache.used == 0                                   # nothing was extracted
    assert explorer.settings(load_size=1024).load_size == 1024          # the bounds themselves are allowed
    assert explorer.settings(load_size=8).load_size == 8
    assert client.post("/api/prepare", json={"settings": {**SETTINGS, "load_size": None}}).status_code == 200
    limits = client.get("/api/state").json()["limits"]
    assert limits["load_size"] == [8, 1024] and limits["k"] == [1, 100]
    # the same bounds for the command's defaults, and a cap on tokens per image (checked before extracting)
    with pytest.raises(DensevitError, match="load size 2000 is out of range: 8 to 1024"):
        Explorer(extractor=make_extractor(8), load_size=2000)
    with pytest.raises(DensevitError, match="stride 1 is not offered for patch size 8"):
        Explorer(extractor=make_extractor(1))
    small = Explorer(extractor=make_extractor(8), weights=str(golden_path), load_size=56, max_tokens=100)
    small.add_image(explorer.images[0].image, "a")
    with pytest.raises(DensevitError, match=r"a at load size 112 and stride 8 is \d+x\d+ = \d+ tokens, more "
                                            r"than the 100 the explorer extracts; choose a smaller load size"):
        small.prepare(small.settings(load_size=112))
    assert small._cache.used == 0


# ---------------------------------------------------------------------------------------------- uploads and save
def multipart(files):
    """A multipart body holding ``files`` [(raw file name bytes, data)] as a browser would send it."""
    boundary = b"----densevitboundary7MA4YWxk"
    out = b""
    for name, data in files:
        out += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="' + name +
                b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n")
    return out + b"--" + boundary + b"--\r\n", "multipart/form-data; boundary=" + boundary.decode()


def test_bad_upload_names_are_reported_and_the_good_files_kept(client, explorer, noise_pair):
    png = png_bytes(noise_pair[0])
    for bad, why in [(b"bad\x00.png", "control character"), (b"b." + b"x" * 300, "302 characters long"),
                     (b"tab\tname.png", "control character")]:
        n = len(explorer.images)
        body, kind = multipart([(b"good.png", png), (bad, png)])
        r = client.post("/api/upload", content=body, headers={"Content-Type": kind})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["added"] == ["good.png"] and len(res["errors"]) == 1 and why in res["errors"][0], res
        assert len(explorer.images) == n + 1 and explorer.images[-1].name == "good.png"
        body, kind = multipart([(bad, png)])                           # only bad files: a 400 the page shows
        assert why in one_line_400(client.post("/api/upload", content=body, headers={"Content-Type": kind}))
        assert len(explorer.images) == n + 1
    long_suffix = b"ok." + b"y" * 200                                   # a long (but legal) name still loads
    body, kind = multipart([(long_suffix, png), (b"corrupt.png", b"\x89PNG\r\n\x1a\n not a png")])
    res = client.post("/api/upload", content=body, headers={"Content-Type": kind}).json()
    assert res["added"] == [long_suffix.decode()] and "cannot read image corrupt.png" in res["errors"][0]


def test_save_writes_only_real_pngs(client, tmp_path, noise_pair):
    saved = tmp_path / "saved"
    url = "data:image/png;base64,"
    real = png_bytes(noise_pair[0])
    for png, why in [(url + "@@@@", "not valid base64"), (url + "abc", "not valid base64"), (url, "not a PNG"),
                     (url + base64.b64encode(b"GIF89a...").decode(), "not a PNG"),
                     (url + base64.b64encode(real[:40]).decode(), "not a readable PNG"),
                     ("data:text/html;base64,PGgxPg==", "nothing to save"), (None, "nothing to save")]:
        msg = one_line_400(client.post("/api/save", json={"png": png, "mode": "pca", "settings": SETTINGS}))
        assert why in msg, (png, msg)
        assert not saved.exists() or not any(saved.iterdir())           # never a file, let alone an empty one
    assert "unknown view" in one_line_400(client.post("/api/save", json={"png": url + base64.b64encode(real)
                                                                         .decode(), "mode": "x"}))
    r = client.post("/api/save", json={"png": url + base64.b64encode(real).decode(), "mode": "similarity",
                                       "settings": SETTINGS, "image": 0, "x": 30, "y": 20, "k": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert open(out["png"], "rb").read() == real and json.loads(open(out["json"]).read())["clicked"]["image"] == 0


# ---------------------------------------------------------------------------------------------- a real server
def _get(url, path, timeout):
    with urllib.request.urlopen(urllib.request.Request(url + path), timeout=timeout) as r:
        return json.loads(r.read())


def _post(url, path, data, kind):
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": kind, "Origin": url.rstrip("/")})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except (urllib.error.URLError, OSError) as exc:
        return exc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_answers_while_the_model_works_and_stops_at_once(tmp_path, noise_pair, golden_path, sig):
    a, b = noise_pair
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    cmd = [sys.executable, "-m", "densevit.apps.cli.explore", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
           "--weights", str(golden_path), "--stride", "8", "--load-size", "56", "--port", "0", "--device", "cpu",
           "--out", str(tmp_path / "saved"), "--quiet", "--allow-host", "explore.lab"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://(\S+)/", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(0).rstrip("/")
        for host, status in [("explore.lab:80", 200), ("evil.example", 400)]:   # --allow-host adds a name
            try:
                code = urllib.request.urlopen(urllib.request.Request(url + "/api/state", headers={"Host": host}),
                                              timeout=30).status
            except urllib.error.HTTPError as exc:
                code = exc.code
            assert code == status, host
        # a long extraction (stride 4 at load size 448: ~16k tokens per image), then an upload behind it
        work = {}
        slow = json.dumps({"settings": {"stride": 4, "load_size": 448, "layer": 11}}).encode()
        t1 = threading.Thread(target=lambda: work.update(prepare=_post(url, "/api/prepare", slow,
                                                                       "application/json")), daemon=True)
        t1.start()
        for _ in range(600):
            if _get(url, "/api/progress", 30)["busy"]:
                break
            time.sleep(0.05)
        body, kind = multipart([(b"c.png", png_bytes(a))])
        t2 = threading.Thread(target=lambda: work.update(upload=_post(url, "/api/upload", body, kind)), daemon=True)
        t2.start()
        time.sleep(0.5)                                                # the upload reaches the server
        p = _get(url, "/api/progress", 20)                        # answers while both wait for the model
        assert p["busy"] and "extracting" in p["message"] and p["queued"] == 1, p
        assert len(_get(url, "/api/state", 20)["images"]) == 2
        assert "prepare" not in work and "upload" not in work           # the work is still running
        proc.send_signal(sig)
        proc.wait(timeout=3)                                            # stops now, not after the extraction
        assert proc.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130)
        t1.join(10)
        t2.join(10)
        for answer in (work["prepare"], work["upload"]):              # both told the explorer is stopping
            assert isinstance(answer, urllib.error.HTTPError) and answer.code == 503, work
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

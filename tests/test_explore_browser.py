"""densevit-explore end to end in a real browser (headless Chromium through selenium and Debian's chromedriver):
start the command on an image and its shifted copy with the golden weights, click as a person would, and read
what the page shows; a page of another local origin tries to drive it, and a rebound host name tries to read it.
Set DENSEVIT_SCREENSHOTS=DIR to keep a screenshot of each step."""
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def server(tmp_path, noise_pair, golden_path):
    a, b = noise_pair                           # b = a's content moved 16 px right: 2 tokens at stride 8
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    cmd = [sys.executable, "-m", "densevit.apps.cli.explore", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
           "--weights", str(golden_path), "--stride", "8", "--load-size", "112", "--port", "0", "--device", "cpu",
           "--out", str(tmp_path / "saved"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    url = re.search(r"http://\S+/", line)
    if not url:
        proc.kill()
        raise AssertionError(f"no address printed: {line!r} {proc.stderr.read()}")
    yield url.group(0), tmp_path
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000",
              "--host-resolver-rules=MAP rebind.test 127.0.0.1"):      # a DNS rebinding name for this machine
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_click_shifted_copy_layer_switch_save_and_bad_upload(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, root = server
    d = browser
    shots = os.environ.get("DENSEVIT_SCREENSHOTS")

    def shot(name):
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(Path(shots) / f"{name}.png"))

    body = lambda: d.find_element(By.TAG_NAME, "body")  # noqa: E731
    renders = lambda: int(body().get_attribute("data-renders"))  # noqa: E731

    def wait_render(before, timeout=60):
        WebDriverWait(d, timeout).until(lambda _: renders() > before and body().get_attribute("data-state") == "ready")

    d.get(url)
    wait_render(0)
    shot("1_initial")
    # everything the page loaded came from the explorer itself (works offline)
    loaded = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(url) or u.startswith("data:") for u in loaded), loaded
    canvases = d.find_elements(By.CSS_SELECTOR, "canvas.view")
    assert len(canvases) == 2
    map_b = lambda: d.execute_script("return arguments[0].toDataURL()", canvases[1])  # noqa: E731
    plain_b = map_b()

    # click at original pixel (60, 50) of the first image (144 x 112 px), as a person would
    cv = canvases[0]
    rect = d.execute_script("return arguments[0].getBoundingClientRect()", cv)
    px, py = 60.0, 50.0
    ox = px / 144 * rect["width"] - rect["width"] / 2
    oy = py / 112 * rect["height"] - rect["height"] / 2
    n = renders()
    ActionChains(d).move_to_element_with_offset(cv, round(ox), round(oy)).click().perform()
    wait_render(n)
    shot("2_click")
    hint = d.find_element(By.ID, "hint")
    cx, cy = float(hint.get_attribute("data-x")), float(hint.get_attribute("data-y"))
    assert abs(cx - px) <= 4 and abs(cy - py) <= 4                     # the clicked token is under the click
    cap = d.find_element(By.ID, "caption-1")
    tx, ty = float(cap.get_attribute("data-top-x")), float(cap.get_attribute("data-top-y"))
    assert abs(tx - (cx + 16)) <= 8 and abs(ty - cy) <= 8                # best match shifted by 2 tokens (+-1)
    assert "best match" in cap.text
    rows = d.find_elements(By.CSS_SELECTOR, "#matches tbody tr[data-image='1'][data-rank='1']")
    assert len(rows) == 1 and float(rows[0].get_attribute("data-x")) == tx
    after_click = map_b()
    assert after_click != plain_b                                        # the heat map is drawn

    # another layer: the map changes
    n = renders()
    Select(d.find_element(By.ID, "layer")).select_by_value("3")
    wait_render(n)
    shot("3_layer3")
    assert map_b() != after_click
    assert "layer" not in d.find_element(By.ID, "error-text").text

    # pixel-dense descriptors (upsampled from the patch stride): one token per pixel, the shift still found
    layer3 = map_b()
    n = renders()
    Select(d.find_element(By.ID, "upsample")).select_by_value("bilinear")
    wait_render(n)
    shot("3b_upsampled")
    assert not d.find_element(By.ID, "error").is_displayed() and map_b() != layer3
    assert not d.find_element(By.ID, "stride").is_enabled()
    cap = d.find_element(By.ID, "caption-1")
    assert abs(float(cap.get_attribute("data-top-x")) - (cx + 16)) <= 8
    n = renders()
    Select(d.find_element(By.ID, "upsample")).select_by_value("none")
    wait_render(n)
    assert d.find_element(By.ID, "stride").is_enabled()

    # save the view: a PNG and a JSON with the clicked point and matches in original pixels
    d.find_element(By.ID, "save").click()
    WebDriverWait(d, 30).until(lambda _: "Saved" in d.find_element(By.ID, "notes").text)
    saved = sorted((root / "saved").glob("*.json"))
    assert len(saved) == 1 and saved[0].with_suffix(".png").stat().st_size > 1000
    rec = json.loads(saved[0].read_text())
    assert rec["settings"]["layer"] == 3 and rec["clicked"]["image"] == 0
    assert abs(rec["clicked"]["x"] - cx) < 1e-6 and "--replay" in rec["replay"]

    # a top-k the server refuses (typed 0): its message in the page; a good value clears it
    error = lambda: d.find_element(By.ID, "error")  # noqa: E731
    k = d.find_element(By.ID, "k")
    k.clear()
    k.send_keys("0\t")
    WebDriverWait(d, 30).until(lambda _: error().is_displayed())
    shot("4_bad_topk")
    assert "top-k must be from 1 to 100, got 0" in d.find_element(By.ID, "error-text").text
    n = renders()
    k.clear()
    k.send_keys("3\t")
    wait_render(n)
    assert not error().is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#matches tbody tr[data-image='1']")) == 3

    # a corrupt upload: a message in the page, and the page still works
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    d.find_element(By.ID, "upload").send_keys(str(bad))
    WebDriverWait(d, 30).until(lambda _: error().is_displayed())
    shot("5_bad_upload")
    assert "cannot read image corrupt.jpg" in d.find_element(By.ID, "error-text").text
    assert len(d.find_elements(By.CSS_SELECTOR, "canvas.view")) == 2
    n = renders()
    Select(d.find_element(By.ID, "layer")).select_by_value("11")
    wait_render(n)
    assert d.find_element(By.ID, "caption-1").get_attribute("data-top-x")

    # a good and a corrupt file in one batch: the good one is added, the bad one named
    n = renders()
    d.find_element(By.ID, "upload").send_keys(f"{root / 'a.png'}\n{bad}")
    WebDriverWait(d, 60).until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "canvas.view")) == 3
                               and renders() > n and error().is_displayed())
    shot("6_mixed_upload")
    assert "cannot read image corrupt.jpg" in d.find_element(By.ID, "error-text").text
    assert d.find_element(By.CSS_SELECTOR, "#card-2 .name").text == "a.png"

    # the original size ("original" load size): extracted and drawn
    n = renders()
    Select(d.find_element(By.ID, "load_size")).select_by_value("original")
    wait_render(n)
    shot("7_original_size")
    assert not error().is_displayed() and d.find_element(By.ID, "caption-2").get_attribute("data-top-x")


EVIL_PAGE = """<!doctype html><title>evil</title><form id="f" method="post" enctype="multipart/form-data"
target="sink"><input type="file" name="files" id="file"></form><iframe name="sink"></iframe><script>
const target = new URLSearchParams(location.search).get("t");
async function go() {
  const png = await (await fetch("/pixel.png")).blob();
  const fd = new FormData();
  fd.append("files", png, "evil.png");
  await fetch(target + "api/upload", {method: "POST", mode: "no-cors", body: fd});     // opaque: never readable
  await fetch(target + "api/prepare", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                       body: JSON.stringify({settings: {load_size: 448, stride: 2}})});
  const dt = new DataTransfer();
  dt.items.add(new File([png], "form.png", {type: "image/png"}));
  const f = document.getElementById("f");
  f.action = target + "api/upload";
  document.getElementById("file").files = dt.files;
  document.querySelector("iframe").onload = () => { document.title = "sent"; };
  f.submit();                                                                            // a classic form post
}
go().catch((e) => { document.title = "failed: " + e; });
</script>"""


def test_other_pages_cannot_drive_it_and_rebound_names_get_nothing(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = server
    d = browser
    site = tmp_path / "evil_site"
    site.mkdir()
    (site / "evil.html").write_text(EVIL_PAGE)
    shutil.copy(root / "a.png", site / "pixel.png")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    state = lambda: json.loads(urllib.request.urlopen(url + "api/state", timeout=30).read())  # noqa: E731
    progress = lambda: json.loads(urllib.request.urlopen(url + "api/progress", timeout=30).read())  # noqa: E731
    try:
        before = [im["name"] for im in state()["images"]]
        d.get(f"http://localhost:{evil.server_address[1]}/evil.html?t={url}")   # another local origin
        WebDriverWait(d, 60).until(lambda _: d.title == "sent" or d.title.startswith("failed"))
        assert d.title == "sent"
        assert [im["name"] for im in state()["images"]] == before     # nothing was added
        assert not progress()["busy"]                                 # nothing is being extracted
    finally:
        evil.shutdown()
    # DNS rebinding: a foreign name resolving to this machine gets no page and no state
    port = re.search(r":(\d+)/", url).group(1)
    d.get(f"http://rebind.test:{port}/api/state")
    shot_dir = os.environ.get("DENSEVIT_SCREENSHOTS")
    if shot_dir:
        d.save_screenshot(str(Path(shot_dir) / "8_rebound_name.png"))
    text = d.find_element(By.TAG_NAME, "body").text
    assert "Invalid host header" in text and "backbone" not in text

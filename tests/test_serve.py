"""The web page, served for real on 127.0.0.1 and opened in headless Chromium (Debian's chromium +
chromium-driver; .ci/run installs them). Browser tests skip with a reason when Chromium is absent."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from dalle_ds.sampling.pipeline import Pipeline
from dalle_ds.serve import App, make_server
from tests.eval_fixtures import make_exports, train_tokenizer, write_image_shards

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_image_shards(root / "shards", 48, size=16)
    tok = train_tokenizer(root / "shards", root / "tok.json", 320)
    prior, dvae = make_exports(root, grid=4)
    app = App(Pipeline(str(prior), str(dvae), str(tok)), n=4, keep=2, max_n=8)
    srv = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()
    srv.server_close()


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read()


def test_api_and_errors(server):
    base, _ = server
    status, body = _get(f"{base}/api/sample?caption=a+red+circle&n=3&keep=2&seed=5")
    r = json.loads(body)
    assert status == 200 and r["seeds"] == [5, 6] and r["scores"] is None
    assert base64.b64decode(r["grid_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{base}/api/sample?caption=x&n=99")
    assert e.value.code == 400 and "n=99" in json.loads(e.value.read())["error"]
    assert _get(f"{base}/healthz") == (200, b"ok\n")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium chromium-driver)")
def test_result_page_renders_in_headless_chromium(server):
    base, root = server
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={root / 'chrome-dump'}", "--dump-dom",
                          f"{base}/?caption=a+blue+square&n=4&keep=2"],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'id="grid"' in dom and "data:image/png;base64," in dom, out.stderr[-2000:]
    assert 'id="result-caption">a blue square<' in dom
    assert 'value="a blue square"' in dom  # the form keeps the caption


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="chromium / chromedriver not installed")
def test_type_a_caption_and_see_the_grid(server):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base, root = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={root / 'chrome-se'}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER, env={**os.environ}))
    try:
        driver.get(base + "/")
        assert driver.find_elements(By.ID, "grid") == []  # nothing before a caption
        box = driver.find_element(By.ID, "caption")
        box.send_keys("a small green triangle")
        driver.find_element(By.ID, "go").click()
        img = WebDriverWait(driver, 120).until(ec.presence_of_element_located((By.ID, "grid")))
        # the PNG really decoded: 2 kept samples of 8px side in a 2x1 grid with 2px gutters
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 22
        assert driver.find_element(By.ID, "result-caption").text == "a small green triangle"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#scores tr")) == 1 + 4 // 2
    finally:
        driver.quit()

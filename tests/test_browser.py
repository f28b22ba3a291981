"""A real headless Chromium against the API: CORS from another origin, and the playground."""

import functools
import http.server
import json
import shutil
import threading

import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import ServerProcess, write_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

OTHER_ORIGIN_PAGE = """<!doctype html>
<html><body>
<img id="img" alt="generated">
<p id="state">waiting</p>
<script>
const api = new URLSearchParams(location.search).get("api");
fetch(api + "/generate", {
  method: "POST",
  headers: {"Content-Type": "application/json"},
  body: JSON.stringify({prompt: "A neon sign in a rainy street", no_text: true, width: 128, height: 64})
}).then((r) => r.json()).then((data) => {
  document.getElementById("state").textContent = "seed " + data.seed;
  document.getElementById("img").src = api + data.url;
}).catch((error) => { document.getElementById("state").textContent = "error: " + error; });
</script>
</body></html>
"""

# A POST that needs a preflight (Authorization, X-Requested-With) into a full queue: the page reads
# the status and Retry-After.
RETRY_PAGE = """<!doctype html>
<html><body>
<p id="state">waiting</p>
<script>
const params = new URLSearchParams(location.search);
fetch(params.get("api") + "/generate", {
  method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer " + params.get("key"),
            "X-Requested-With": "XMLHttpRequest"},
  body: JSON.stringify({prompt: "one too many", wait: false})
}).then((r) => {
  document.getElementById("state").textContent = r.status + " retry after " + r.headers.get("Retry-After");
}).catch((error) => { document.getElementById("state").textContent = "error: " + error; });
</script>
</body></html>
"""
KEY = "browser-key-1234"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("browser")
    server = ServerProcess(write_config(folder, tiny_dir)).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory, tiny_dir):
    """The API alone (no worker) with a key and room for one queued job, which is taken; outputs/
    holds a finished job, and the record of one whose image is gone."""
    folder = tmp_path_factory.mktemp("keyed")
    api = ServerProcess(write_config(folder, tiny_dir, http={"api_key": KEY, "max_queue": 1, "threads": 5}),
                        command="api").start()
    outputs = folder / "outputs"
    Image.new("RGB", (32, 32), (0, 90, 200)).save(outputs / "kept.png")
    for job_id in ("kept", "gone"):
        (outputs / f"{job_id}.json").write_text(json.dumps({
            "id": job_id, "type": "generate", "status": "done", "url": f"/outputs/{job_id}.png", "seed": 1,
            "width": 32, "height": 32}))
    response = requests.post(api.url + "/generate", json={"prompt": "queued", "wait": False},
                             headers={"X-API-Key": KEY}, timeout=30)
    assert response.status_code == 202
    yield api
    api.kill()


@pytest.fixture
def other_origin(tmp_path):
    """A static page on its own port: a different origin from the API."""
    (tmp_path / "index.html").write_text(OTHER_ORIGIN_PAGE)
    (tmp_path / "retry.html").write_text(RETRY_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def loaded_width(driver, element_id):
    return driver.execute_script(
        "const img = document.getElementById(arguments[0]);"
        "return img && img.complete ? img.naturalWidth : 0;", element_id)


def test_a_page_on_another_origin_generates_and_shows_an_image(browser, server, other_origin):
    browser.get(f"{other_origin}/index.html?api={server.url}")
    WebDriverWait(browser, 90, poll_frequency=0.2).until(lambda d: loaded_width(d, "img") > 0)
    assert loaded_width(browser, "img") == 128
    assert browser.find_element(By.ID, "state").text.startswith("seed ")


def test_the_playground_generates_and_shows_the_image(browser, server):
    browser.get(server.url + "/")
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse in the fog")
    Select(browser.find_element(By.ID, "width")).select_by_visible_text("256")
    Select(browser.find_element(By.ID, "height")).select_by_visible_text("256")
    browser.find_element(By.ID, "seed").send_keys("77")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 90, poll_frequency=0.2).until(lambda d: loaded_width(d, "result-image") > 0)
    assert loaded_width(browser, "result-image") == 256
    assert "seed 77" in browser.find_element(By.ID, "status").text
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#recent img"))


def test_the_playground_shows_errors(browser, server):
    browser.get(server.url + "/")
    browser.execute_script("document.getElementById('prompt').removeAttribute('required')")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: "prompt" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"


def test_a_page_on_another_origin_reads_retry_after_from_a_full_queue(browser, keyed_api, other_origin):
    browser.get(f"{other_origin}/retry.html?api={keyed_api.url}&key={KEY}")
    WebDriverWait(browser, 30, poll_frequency=0.2).until(lambda d: d.find_element(By.ID, "state").text != "waiting")
    assert browser.find_element(By.ID, "state").text == "503 retry after 2"


def test_the_playground_with_a_key_opens_outputs_it_can_show(browser, keyed_api):
    """With a key, an output opens from the image the page fetched (its own URL would need the key
    too); an output that cannot be fetched says so."""
    browser.get(keyed_api.url + "/")
    browser.execute_script(f"localStorage.setItem('fluxworker-api-key', '{KEY}')")
    browser.refresh()
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent figcaption")) == 2)
    kept = browser.find_element(By.CSS_SELECTOR, "#recent img[alt='kept']")
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", kept) == 32)
    browser.execute_script("window.opened = []; window.open = (url) => { window.opened.push(url); return null; };")
    kept.click()
    opened = browser.execute_script("return window.opened")
    assert len(opened) == 1 and opened[0].startswith("blob:")
    gone = browser.find_element(By.XPATH, "//img[@alt='gone']/following-sibling::figcaption")
    assert gone.get_attribute("class") == "error"
    assert "404" in gone.text

"""The chat page at ``/`` of ``slm serve``, in headless Chromium (Selenium), against a real server process.

Needs the Debian packages chromium and chromium-driver (``make install-test`` installs them as root).
Leaves a screenshot in tests/artifacts/chat_page.png.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

KEY = "page-key-42"
MODEL = "smollm2-135m-instruct"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not found: apt-get install chromium "
                                                        "chromium-driver (make install-test does, as root)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base, path, key=KEY):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def metric(base, name) -> float:
    text = get(base, "/metrics")[2]
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", str(smollm2_gguf), "--port", str(port),
                             "--api-key", KEY, "--model-id", MODEL, "--max-batch", "4", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode())
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start")
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(server + "/")
    yield driver
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "chat_page_end.png"))  # the page as the last test left it
    driver.quit()


def until(predicate, timeout=30.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def el(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css)


def set_field(driver, css, value):
    field = el(driver, css)
    field.clear()
    field.send_keys(str(value))


def last_reply(driver):
    """(state, text, meta text, meta data) of the newest assistant message, read in one go."""
    return driver.execute_script("""
        const items = document.querySelectorAll('#log li.assistant');
        const li = items[items.length - 1];
        if (!li) return null;
        const meta = li.querySelector('.meta');
        return [li.dataset.state || '', li.querySelector('.text').textContent, meta.textContent, {...meta.dataset}];
    """)


def send(driver, text):
    box = el(driver, "#input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def watch_reply(driver, timeout=60.0):
    """Poll the newest reply until it is no longer streaming; return the distinct text lengths seen while it
    was streaming and the final (state, text, meta, data)."""
    lengths, deadline = [], time.time() + timeout
    while time.time() < deadline:
        reply = last_reply(driver)
        if reply and reply[0] != "streaming" and reply[0] != "":
            return lengths, reply
        if reply and reply[1] and (not lengths or lengths[-1] != len(reply[1])):
            lengths.append(len(reply[1]))
        time.sleep(0.01)
    raise AssertionError("the reply did not finish")


def test_page_loads_without_a_key_and_takes_one(server, browser):
    status, kind, html = get(server, "/", key=None)  # the page itself needs no key ...
    assert status == 200 and kind.startswith("text/html") and "<title>slmkit chat</title>" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # ... and loads nothing from elsewhere
    # ... but the API does: the page says so, and works once the key is entered
    until(lambda: not el(browser, "#error").get_attribute("hidden"), 20, "the API key error")
    assert "API key" in el(browser, "#error").text
    set_field(browser, "#api-key", KEY)
    el(browser, "#api-key").send_keys(Keys.TAB)
    until(lambda: MODEL in el(browser, "#model-line").text, 20, "the model line")
    assert el(browser, "#error").get_attribute("hidden")
    info = el(browser, "#model-info").text
    assert "llama" in info and "int4" in info and "8192" in info, info
    assert json.loads(get(server, "/v1/model_info")[2])["family"] == "llama"
    # Shift+Enter is a new line, not a send
    box = el(browser, "#input")
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
    assert box.get_attribute("value") == "line one\nline two"
    assert not browser.find_elements(By.CSS_SELECTOR, "#log li")
    box.clear()


def test_reply_streams_and_shows_tokens_per_second(server, browser):
    set_field(browser, "#temperature", 0)
    set_field(browser, "#max-tokens", 48)
    send(browser, "Tell me three facts about the Moon.")
    lengths, (state, text, meta, data) = watch_reply(browser)
    assert state == "done", (state, meta)
    streamed = [n for n in lengths if n < len(text)]
    assert len(set(streamed)) >= 2, f"saw the reply at lengths {lengths} (final {len(text)}): not streamed"
    assert re.search(r"\d+ tokens · [\d.]+ tokens/s", meta), meta
    assert float(data["tokensPerSecond"]) > 0 and 0 < int(data["completionTokens"]) <= 48
    assert el(browser, "#send").is_enabled() and not el(browser, "#stop").is_enabled()


def test_second_turn_sends_the_whole_conversation(server, browser):
    first_question = "Tell me three facts about the Moon."
    first_answer = last_reply(browser)[1]
    question = "Which <b>one</b> is the most surprising?"
    send(browser, question)
    _, (state, text, meta, data) = watch_reply(browser)
    assert state == "done" and text, meta
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log li.user .text")]
    assert users == [first_question, question]  # shown as text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#log b")
    # the server saw exactly the conversation so far: the same messages tokenize to its prompt length
    history = [{"role": "user", "content": first_question}, {"role": "assistant", "content": first_answer},
               {"role": "user", "content": question}]
    assert int(data["promptTokens"]) == post(server, "/tokenize", {"messages": history})["count"]


def test_stop_ends_a_long_reply_and_the_server_cancels_it(server, browser):
    cancelled = metric(server, "slmkit_cancelled_sequences_total")
    set_field(browser, "#max-tokens", 1000)
    send(browser, "Write a long story about a dragon who learns to cook.")
    until(lambda: (r := last_reply(browser)) and r[0] == "streaming" and len(r[1]) > 30, 30, "the story")
    el(browser, "#stop").click()
    until(lambda: last_reply(browser)[0] == "stopped", 10, "the stopped state")
    state, text, meta, data = last_reply(browser)
    assert meta.startswith("stopped") and int(data["completionTokens"]) < 1000, meta
    time.sleep(0.5)
    assert last_reply(browser)[1] == text  # nothing more arrives
    assert el(browser, "#send").is_enabled() and not el(browser, "#stop").is_enabled()
    until(lambda: metric(server, "slmkit_cancelled_sequences_total") > cancelled, 10, "the server to cancel")
    until(lambda: metric(server, "slmkit_active_sequences") == 0, 10, "the sequence to leave")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))


def test_api_errors_are_shown(server, browser):
    set_field(browser, "#max-tokens", 100000)  # over the model's context: the server answers 400
    send(browser, "Hello?")
    until(lambda: not el(browser, "#error").get_attribute("hidden"), 20, "the error")
    assert "context" in el(browser, "#error").text
    assert el(browser, "#input").get_attribute("value") == "Hello?"  # given back to fix and resend
    assert "failed" in browser.find_elements(By.CSS_SELECTOR, "#log li.user")[-1].get_attribute("class")

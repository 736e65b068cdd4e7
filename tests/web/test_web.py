#!/usr/bin/env python3
"""End-to-end test of the web page served at `/` by `kvinfer serve`.

Starts the server on a free port, drives headless Chromium through two chat turns and checks that
the replies stream in, that the second turn hits the prefix cache (the hit rate on the page rises),
that the cache panel agrees with /v1/stats, saves a screenshot, and that the server stops cleanly
on SIGINT. Run it through scripts/test-web, which installs Chromium and Selenium.

Environment:
  KVINFER_BIN             the binary (default: target/release/kvinfer, then $CARGO_TARGET_DIR/release/kvinfer)
  KVINFER_WEB_MODEL       the model to serve (default: smollm2); KVINFER_MODELS says where models live
  KVINFER_WEB_SCREENSHOT  where to save the screenshot (default: docs/results/web.png)
  KVINFER_WEB_TIMEOUT     overall limit in seconds (default: 300)
  CHROMIUM, CHROMEDRIVER  the browser and its driver (default: found on PATH)
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 40  # short replies keep the test quick; greedy, so they are the same every run


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def wait_for(what, fn, timeout_s, interval_s=0.1):
    """Calls fn until it returns something truthy; fails with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_err = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except TestFailure:
            raise
        except Exception as e:  # the page or server may not be ready yet
            last_err = e
        time.sleep(interval_s)
    raise TestFailure(f"timed out after {timeout_s:.0f} s waiting for {what}"
                      + (f" (last error: {last_err})" if last_err else ""))


def find_binary():
    if os.environ.get("KVINFER_BIN"):
        return Path(os.environ["KVINFER_BIN"])
    candidates = [ROOT / "target/release/kvinfer"]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release/kvinfer")
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


class Server:
    def __init__(self, binary, model, port):
        self.log = tempfile.NamedTemporaryFile(prefix="kvinfer-web-", suffix=".log", delete=False)
        self.base = f"http://127.0.0.1:{port}"
        cmd = [str(binary), "serve", "--model", model, "--port", str(port), "--threads", "2"]
        print("starting:", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log_tail(self, n=30):
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def wait_healthy(self, timeout_s):
        def healthy():
            if self.proc.poll() is not None:
                raise TestFailure(f"the server exited with {self.proc.returncode} before it was healthy")
            return get_json(self.base + "/health").get("status") == "ok"
        wait_for("GET /health", healthy, timeout_s, interval_s=0.25)

    def stop(self):
        """SIGINT, then the exit status (graceful shutdown)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise TestFailure("the server did not exit within 30 s of SIGINT")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_browser():
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    check(chromium and driver, "chromium or chromedriver not found: run scripts/test-web, which "
          "installs them (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,700", "--hide-scrollbars"]:
        opts.add_argument(a)
    # An explicit driver path keeps Selenium from trying to download one (no internet here).
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def text(browser, css):
    return browser.find_element(By.CSS_SELECTOR, css).text.strip()


def panel_int(browser, id_):
    t = text(browser, "#" + id_)
    check(re.fullmatch(r"\d+", t), f"#{id_} should be a number, is {t!r}")
    return int(t)


def hit_rate(browser):
    t = text(browser, "#hit-rate")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", t)
    check(m, f"#hit-rate should read like '41.2%', reads {t!r}")
    return float(m.group(1))


def chat_turn(browser, server, turn, message):
    """Sends `message`, waits for the streamed reply to end; returns (reply, meta line)."""
    box = browser.find_element(By.ID, "input")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)  # Enter sends
    done = f'#messages .assistant[data-done="1"]'
    wait_for(f"assistant reply {turn} to finish streaming",
             lambda: len(browser.find_elements(By.CSS_SELECTOR, done)) >= turn, 120, 0.2)
    el = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")[turn - 1]
    reply = el.text.strip()
    check("error" not in el.get_attribute("class"), f"turn {turn} ended in an error: {reply}")
    check(reply, f"assistant reply {turn} is empty")
    meta = browser.find_elements(By.CSS_SELECTOR, "#messages .meta")
    check(len(meta) >= turn, f"no usage line after reply {turn}")
    # The panel refreshes every 500 ms: wait until it shows this turn's request as finished.
    def panel_caught_up():
        s = get_json(server.base + "/v1/stats")
        return (s["requests_total"] == turn and s["running"] == 0
                and text(browser, "#requests") == str(turn)
                and text(browser, "#running") == "0 / 0")
    wait_for(f"the cache panel to show request {turn} finished", panel_caught_up, 10, 0.2)
    return reply, meta[turn - 1].text.strip()


def cached_tokens(meta_line):
    m = re.search(r"prompt (\d+) tokens, (\d+) cached, .*TTFT \d+ ms", meta_line)
    check(m, f"usage line should read 'prompt N tokens, M cached, ... TTFT x ms', reads {meta_line!r}")
    return int(m.group(1)), int(m.group(2))


def check_panel_matches_stats(browser, server):
    def consistent():
        s = get_json(server.base + "/v1/stats")["blocks"]
        shown = {k: panel_int(browser, k) for k in
                 ["blocks-used", "blocks-cached", "blocks-free", "blocks-total", "evictions"]}
        want = {"blocks-used": s["in_use"], "blocks-cached": s["cached"], "blocks-free": s["free"],
                "blocks-total": s["total"], "evictions": s["evictions"]}
        return shown if shown == want else None
    shown = wait_for("the cache panel to match /v1/stats", consistent, 5, 0.2)
    check(shown["blocks-used"] + shown["blocks-cached"] + shown["blocks-free"] == shown["blocks-total"],
          f"used + cached + free != total on the page: {shown}")
    check(shown["blocks-cached"] > 0, f"no cached blocks after two turns: {shown}")
    return shown


def run():
    binary = find_binary()
    check(binary.exists(), f"kvinfer binary not found at {binary}: build it with "
          "`cargo build --release -p kvinfer` or set KVINFER_BIN")
    model = os.environ.get("KVINFER_WEB_MODEL", "smollm2")
    shot = Path(os.environ.get("KVINFER_WEB_SCREENSHOT", ROOT / "docs/results/web.png"))
    server = Server(binary, model, free_port())
    browser = None
    try:
        server.wait_healthy(120)
        browser = start_browser()
        browser.get(server.base + "/")
        wait_for("the cache panel's first /v1/stats", lambda: text(browser, "#blocks-total") != "–", 10)
        browser.execute_script(
            "const m = document.getElementById('max-tokens'); m.value = arguments[0];"
            "m.dispatchEvent(new Event('change'));", MAX_TOKENS)

        reply1, meta1 = chat_turn(browser, server, 1, "What is the capital of France?")
        rate1 = hit_rate(browser)
        print(f"turn 1: {meta1}; hit rate {rate1}%\n  reply: {reply1[:80]!r}", flush=True)
        reply2, meta2 = chat_turn(browser, server, 2, "And what is the capital of Germany?")
        rate2 = hit_rate(browser)
        print(f"turn 2: {meta2}; hit rate {rate2}%\n  reply: {reply2[:80]!r}", flush=True)

        prompt2, cached2 = cached_tokens(meta2)
        cached_tokens(meta1)
        check(cached2 > 0, f"the second turn took no tokens from the prefix cache: {meta2!r}")
        check(rate2 > rate1, f"the hit rate did not rise on the second turn: {rate1}% -> {rate2}%")
        shown = check_panel_matches_stats(browser, server)
        print(f"cache panel: {shown}", flush=True)

        shot.parent.mkdir(parents=True, exist_ok=True)
        check(browser.save_screenshot(str(shot)), f"could not save the screenshot to {shot}")
        print(f"screenshot: {shot} ({shot.stat().st_size // 1024} KiB)", flush=True)

        # An HTTP error is shown in the chat, not swallowed: ask for more tokens than fit.
        browser.execute_script("document.getElementById('max-tokens').value = 1000000;")
        browser.find_element(By.ID, "input").send_keys("This one fails." + Keys.ENTER)
        done = '#messages .assistant[data-done="1"]'
        wait_for("the failed turn to be marked done",
                 lambda: len(browser.find_elements(By.CSS_SELECTOR, done)) >= 3, 10, 0.2)
        el = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")[2]
        check("error" in el.get_attribute("class") and "max_tokens" in el.text,
              f"an over-long max_tokens should show the server's error in the chat; shows {el.text!r}")
        browser.quit()
        browser = None

        rc = server.stop()
        check(rc == 0, f"the server exited with {rc} on SIGINT (want 0)")
        os.unlink(server.log.name)
    except TestFailure:
        print(f"server log ({server.log.name}), last lines:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        if browser is not None:
            browser.quit()
        server.kill()


def main():
    timeout_s = int(os.environ.get("KVINFER_WEB_TIMEOUT", "300"))

    def on_alarm(*_):
        raise TestFailure(f"the whole test took longer than {timeout_s} s (KVINFER_WEB_TIMEOUT)")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout_s)
    t0 = time.monotonic()
    try:
        run()
    except TestFailure as e:
        print(f"FAIL test_web: {e}", file=sys.stderr)
        return 1
    print(f"ok test_web ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

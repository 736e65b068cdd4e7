#!/usr/bin/env python3
"""End-to-end test of the web page served at `/` by `kvinfer serve`.

Starts the server on a free port, drives headless Chromium through two chat turns and checks that
the replies stream in, that the second turn hits the prefix cache (the hit rate on the page rises),
that the cache panel agrees with /v1/stats, that the tier table (a RAM and a disk tier; then a
made-up worst case of long names and numbers) fits its panel, saves a screenshot, and that the
server stops cleanly on SIGINT. Run it through scripts/test-web, which installs Chromium and
Selenium.

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
    def __init__(self, binary, model, port, extra=()):
        self.log = tempfile.NamedTemporaryFile(prefix="kvinfer-web-", suffix=".log", delete=False)
        self.base = f"http://127.0.0.1:{port}"
        cmd = [str(binary), "serve", "--model", model, "--port", str(port), "--threads", "2", *extra]
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


def chat_turn(browser, server, turn, message, index=None):
    """Sends `message` as request number `turn` (the `index`-th reply on the page, default
    `turn`), waits for the streamed reply to end; returns (reply, meta line)."""
    index = index or turn
    box = browser.find_element(By.ID, "input")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)  # Enter sends
    done = f'#messages .assistant[data-done="1"]'
    wait_for(f"assistant reply {turn} to finish streaming",
             lambda: len(browser.find_elements(By.CSS_SELECTOR, done)) >= index, 120, 0.2)
    el = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")[index - 1]
    reply = el.text.strip()
    check("error" not in el.get_attribute("class"), f"turn {turn} ended in an error: {reply}")
    check(reply, f"assistant reply {turn} is empty")
    meta = browser.find_elements(By.CSS_SELECTOR, "#messages .meta")
    check(len(meta) >= index, f"no usage line after reply {turn}")
    # The panel refreshes every 500 ms: wait until it shows this turn's request as finished.
    def panel_caught_up():
        s = get_json(server.base + "/v1/stats")
        return (s["requests_total"] == turn and s["running"] == 0
                and text(browser, "#requests") == str(turn)
                and text(browser, "#running") == "0 / 0")
    wait_for(f"the cache panel to show request {turn} finished", panel_caught_up, 10, 0.2)
    return reply, meta[index - 1].text.strip()


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


FITS = """
const table = document.getElementById("tiers"), panel = table.closest("aside");
const cs = getComputedStyle(panel);
const contentRight = panel.getBoundingClientRect().right - parseFloat(cs.paddingRight)
  - parseFloat(cs.borderRightWidth);
const cut = [...table.querySelectorAll("th, td")].filter((c) => c.scrollWidth > c.clientWidth + 1)
  .map((c) => c.textContent);
return {table: table.scrollWidth, panel: panel.clientWidth, panelScroll: panel.scrollWidth,
        tableRight: table.getBoundingClientRect().right, contentRight, cut,
        rows: table.querySelectorAll("tr.tier-row").length};
"""

# The widest rows the tier table may have to show.
WORST_TIERS = [
    {"name": name, "entries": 123456789, "bytes": 987654321098, "hits": 1234567890,
     "misses": 9876543210, "errors": 123456, "timeouts": 7890, "corrupt": 42, "healthy": healthy}
    for name, healthy in [("ram", True), ("disk", True), ("redis-cluster", False)]
]


def check_tier_table_fits(browser, what, rows, tiers=None):
    """The tier table's scroll width is within its panel: nothing cut off on the right. With
    `tiers`, the page's renderer draws them first (in the same script: no poll in between)."""
    draw = "renderTiers(arguments[0]);\n" if tiers is not None else ""
    m = browser.execute_script(draw + FITS, tiers)
    check(m["rows"] == rows, f"{what}: the tier table should show {rows} tiers, shows {m}")
    check(m["table"] <= m["panel"] and m["panelScroll"] <= m["panel"]
          and m["tableRight"] <= m["contentRight"] + 0.5,
          f"{what}: the tier table overflows its panel: {m}")
    check(not m["cut"], f"{what}: tier table cells overflow: {m['cut']}")
    return m


FETCH = """
const [url, contentType, mode, done] = arguments;
fetch(url, {method: "POST", mode, headers: {"Content-Type": contentType},
            body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 2})})
  .then(async (r) => done({ok: true, type: r.type, status: r.status, body: r.type === "opaque" ? "" : await r.text()}))
  .catch((e) => done({ok: false, error: String(e)}));
"""


def cors_checks(browser, binary, model, server):
    """A page from another origin: its JSON POST (preflighted) is refused by the browser unless
    --cors-origins names that origin; its simple text/plain POST (no preflight) is refused by
    the server (nothing reaches the engine)."""
    page_dir = tempfile.mkdtemp(prefix="kvinfer-foreign-")
    Path(page_dir, "index.html").write_text("<!doctype html><title>foreign</title><p>foreign page")
    fport = free_port()
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(fport), "--bind", "127.0.0.1",
                                "--directory", page_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    origin = f"http://127.0.0.1:{fport}"
    allowed = None
    try:
        wait_for("the foreign page's server", lambda: urllib.request.urlopen(origin + "/", timeout=2).status == 200, 10, 0.2)
        browser.set_script_timeout(60)
        browser.get(origin + "/")
        api = server.base + "/v1/chat/completions"
        before = get_json(server.base + "/v1/stats")["requests_total"]
        r = browser.execute_async_script(FETCH, api, "application/json", "cors")
        check(not r["ok"], f"CORS off: a foreign page's JSON POST should fail its preflight; got {r}")
        r = browser.execute_async_script(FETCH, api, "text/plain", "no-cors")
        time.sleep(0.5)
        after = get_json(server.base + "/v1/stats")["requests_total"]
        check(after == before, f"a foreign page's simple POST reached the engine ({before} -> {after} requests)")
        print(f"cors off: preflighted POST refused, simple POST refused ({r})", flush=True)

        allowed = Server(binary, model, free_port(), ["--cors-origins", origin])
        allowed.wait_healthy(120)
        r = browser.execute_async_script(FETCH, allowed.base + "/v1/chat/completions", "application/json", "cors")
        check(r["ok"] and r["status"] == 200 and "choices" in json.loads(r["body"]),
              f"--cors-origins {origin}: the page's JSON POST should succeed; got {r}")
        r = browser.execute_async_script(FETCH, allowed.base + "/v1/chat/completions", "text/plain", "cors")
        print(f"cors on for {origin}: JSON POST answered 200; text/plain -> {r.get('status')}", flush=True)
        rc = allowed.stop()
        check(rc == 0, f"the CORS server exited with {rc}")
    finally:
        foreign.kill()
        foreign.wait()
        if allowed is not None:
            allowed.kill()


def run():
    binary = find_binary()
    check(binary.exists(), f"kvinfer binary not found at {binary}: build it with "
          "`cargo build --release -p kvinfer` or set KVINFER_BIN")
    model = os.environ.get("KVINFER_WEB_MODEL", "smollm2")
    shot = Path(os.environ.get("KVINFER_WEB_SCREENSHOT", ROOT / "docs/results/web.png"))
    disk_tier = tempfile.mkdtemp(prefix="kvinfer-web-disk-")
    # Two tiers below the pool, so the panel's tier table has rows.
    server = Server(binary, model, free_port(), ["--ram-tier-mb", "64", "--disk-tier", disk_tier])
    browser = None
    try:
        server.wait_healthy(120)
        browser = start_browser()
        browser.get(server.base + "/")
        wait_for("the cache panel's first /v1/stats", lambda: text(browser, "#blocks-total") != "–", 10)
        browser.execute_script(
            "const m = document.getElementById('max-tokens'); m.value = arguments[0];"
            "m.dispatchEvent(new Event('change'));"
            "document.getElementById('temperature').value = 0;", MAX_TOKENS)

        reply1, meta1 = chat_turn(browser, server, 1, "What is the capital of France?")
        rate1 = hit_rate(browser)
        print(f"turn 1: {meta1}; hit rate {rate1}%\n  reply: {reply1[:80]!r}", flush=True)
        reply2, meta2 = chat_turn(browser, server, 2, "And what is the capital of Germany?")
        rate2 = hit_rate(browser)
        print(f"turn 2: {meta2}; hit rate {rate2}%\n  reply: {reply2[:80]!r}", flush=True)

        check(re.search(r"seed \d+", meta2), f"the usage line should show the seed: {meta2!r}")
        titles = [e.get_attribute("title") or "" for e in
                  browser.find_elements(By.CSS_SELECTOR, "#messages .assistant span.tok")]
        check(titles and all("%" in t for t in titles),
              f"every streamed piece should carry its token probabilities on hover: {titles[:3]}")
        prompt2, cached2 = cached_tokens(meta2)
        cached_tokens(meta1)
        check(cached2 > 0, f"the second turn took no tokens from the prefix cache: {meta2!r}")
        check(rate2 > rate1, f"the hit rate did not rise on the second turn: {rate1}% -> {rate2}%")
        shown = check_panel_matches_stats(browser, server)
        print(f"cache panel: {shown}", flush=True)
        fit = check_tier_table_fits(browser, "ram and disk tiers", 2)
        print(f"tier table: {fit['table']} px wide in a {fit['panel']} px panel", flush=True)

        shot.parent.mkdir(parents=True, exist_ok=True)
        check(browser.save_screenshot(str(shot)), f"could not save the screenshot to {shot}")
        print(f"screenshot: {shot} ({shot.stat().st_size // 1024} KiB)", flush=True)
        # The worst case, drawn by the page's own renderer (the next poll draws the real rows).
        check(browser.execute_script("return typeof renderTiers") == "function",
              "the page should draw its tier rows with renderTiers(tiers)")
        check_tier_table_fits(browser, "long names and numbers", 3, WORST_TIERS)

        # JSON mode: the reply is a JSON object (when it ends before max tokens).
        browser.execute_script(
            "document.getElementById('json-mode').click();"
            "document.getElementById('max-tokens').value = 200;"
            "document.getElementById('clear').click();")
        reply3, meta3 = chat_turn(browser, server, 3, "Describe a cat as JSON.", index=1)
        generated = int(re.search(r"(\d+) generated", meta3).group(1))
        check(reply3.startswith("{"), f"JSON mode should reply with an object: {reply3!r}")
        if generated < 200:
            check(isinstance(json.loads(reply3), dict), f"JSON mode reply does not parse: {reply3!r}")
        print(f"json mode: {reply3[:80]!r} ({generated} tokens)", flush=True)
        browser.execute_script("document.getElementById('json-mode').click();")

        # An HTTP error is shown in the chat, not swallowed: ask for more tokens than fit.
        browser.execute_script("document.getElementById('max-tokens').value = 1000000;")
        browser.find_element(By.ID, "input").send_keys("This one fails." + Keys.ENTER)
        done = '#messages .assistant[data-done="1"]'
        wait_for("the failed turn to be marked done",
                 lambda: len(browser.find_elements(By.CSS_SELECTOR, done)) >= 2, 10, 0.2)
        el = browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")[1]
        check("error" in el.get_attribute("class") and "max_tokens" in el.text,
              f"an over-long max_tokens should show the server's error in the chat; shows {el.text!r}")
        cors_checks(browser, binary, model, server)
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
        shutil.rmtree(disk_tier, ignore_errors=True)


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

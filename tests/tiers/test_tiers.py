"""KV tiers end to end with the real default model, through HTTP and the official `openai`
client:

- restart: serve, stop (SIGTERM), serve again on the same --disk-tier: the first repeated
  request reports cached_tokens > 0 and answers exactly as the first time;
- kill -9 while the disk tier is being written, then restart: temp files are swept, no block
  is refused as corrupt (a block is renamed into place whole or not at all), outputs equal;
- two servers on one redis-server, and on a three-node Redis Cluster: the second gets the
  first's prefix and answers exactly as a server without any cache;
- POST /v1/cache/clear (behind --api-key), `kvinfer cache stats` and `kvinfer cache clear`.

Run by tests/tiers/run. Each check prints ok/FAIL; the exit status is the number of failures.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import openai

BIN = os.environ.get("KVINFER_BIN", "target/release/kvinfer")
SYSTEM = ("You are a terse assistant for a hardware store. You answer questions about tools, "
          "paint, screws, nails, glue and garden supplies in one or two short sentences, and you "
          "never invent prices. If you do not know, you say so. Always be polite and precise.")
TMP = tempfile.mkdtemp(prefix="kvinfer-tiers-")


def free_port(cluster=False):
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if not cluster or p + 10000 < 65536:
            return p


class Server:
    """One `kvinfer serve` with the given extra flags; `prefix`: a command to run it under
    (`["prlimit", "--nofile=256:256"]`)."""

    def __init__(self, *flags, key=None, prefix=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(TMP, f"serve-{self.port}.log"), "w+")
        cmd = [BIN, "serve", "--port", str(self.port), "--threads", "2", "--kv-cache-mb", "128",
               *flags]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen([*prefix, *cmd], stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                break
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kvinfer serve died: {self.tail()}")
                time.sleep(0.1)
        self.key = key
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused",
                                    max_retries=0, timeout=300)
        self.model = self.client.models.list().data[0].id

    def tail(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-2000:]

    def chat(self, user, max_tokens=24):
        r = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=max_tokens,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        cached = r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
        return r.choices[0].message.content, cached

    def stats(self):
        req = urllib.request.Request(self.url + "/v1/stats")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def tier(self, name):
        return next(t for t in self.stats()["tiers"] if t["name"] == name)

    def stop(self):
        """SIGTERM: a clean shutdown flushes pending tier writes."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        assert rc == 0, f"exit {rc}: {self.tail()}"

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


class Redis:
    def __init__(self, cluster=False):
        self.port = free_port(cluster)
        self.dir = os.path.join(TMP, f"redis-{self.port}")
        os.makedirs(self.dir)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.dir]
        if cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                           text=True)
        return r.stdout.strip()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def reference(question):
    """The answer of a server with no tier and a fresh pool."""
    s = Server()
    try:
        return s.chat(question)[0]
    finally:
        s.stop()


def wait_until(cond, what, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def disk_blocks(d):
    out = subprocess.run([BIN, "cache", "stats", "--disk-tier", d, "--json"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)["disk"]


Q1 = "Which glue holds wood best?"
Q2 = "What screws go into drywall?"


def test_restart_from_disk():
    want = reference(Q1)
    d = os.path.join(TMP, "disk-restart")
    s = Server("--disk-tier", d)
    first, cached = s.chat(Q1)
    assert cached == 0, cached
    assert first == want, (first, want)
    s.stop()
    assert disk_blocks(d)["blocks"] > 0
    s = Server("--disk-tier", d)
    again, cached = s.chat(Q1)
    assert cached > 0, "the repeated request found nothing on disk"
    assert again == want, (again, want)
    t = s.tier("disk")
    assert t["hits"] > 0 and t["corrupt"] == 0, t
    s.stop()


def test_kill9_during_disk_writes():
    d = os.path.join(TMP, "disk-kill9")
    questions = [f"{Q2} Answer for case number {i}, please, with care." for i in range(6)]
    wants = {}
    ref = Server()
    for q in questions:
        wants[q] = ref.chat(q, max_tokens=8)[0]
    ref.stop()
    s = Server("--disk-tier", d)
    # Heavy writes: several requests at once, each writing its blocks through to disk.
    procs = [subprocess.Popen([sys.executable, "-c", (
        "import openai,sys;c=openai.OpenAI(base_url=sys.argv[1],api_key='x',max_retries=0);"
        "c.chat.completions.create(model='m',max_tokens=64,temperature=0,"
        "messages=[{'role':'user','content':sys.argv[2]*20}])"), s.url + "/v1", q],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # they see the kill as an error
        for q in questions]
    time.sleep(2.0)
    s.kill9()
    for p in procs:
        p.wait(timeout=60)
    s = Server("--disk-tier", d)
    assert disk_blocks(d)["temp_files"] == 0, "temp files swept at start-up"
    for q in questions:
        got = s.chat(q, max_tokens=8)[0]
        assert got == wants[q], (q, got, wants[q])
    t = s.tier("disk")
    assert t["corrupt"] == 0, f"a partial block was read: {t}"
    s.stop()


def shared(flags):
    want = reference(Q2)
    a = Server(*flags)
    b = Server(*flags)
    try:
        first, _ = a.chat(Q2)
        assert first == want, (first, want)
        name = a.stats()["tiers"][0]["name"]
        wait_until(lambda: a.tier(name)["puts"] > 0 and a.stats()["waiting"] == 0, "writes")
        time.sleep(0.3)
        got, cached = b.chat(Q2)
        assert cached > 0, "the second server did not get the first's prefix"
        assert got == want, (got, want)
        assert b.tier(name)["hits"] > 0
    finally:
        a.stop()
        b.stop()


def test_two_servers_share_through_redis():
    r = Redis()
    try:
        shared(["--redis", f"redis://127.0.0.1:{r.port}"])
    finally:
        r.stop()


def test_two_servers_share_through_a_redis_cluster():
    nodes = [Redis(cluster=True) for _ in range(3)]
    try:
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True)
        wait_until(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes),
                   "cluster_state:ok")
        shared(["--redis-cluster", ",".join(addrs)])
        assert sum(int(n.cli("DBSIZE")) for n in nodes) > 0
    finally:
        for n in nodes:
            n.stop()


def test_cache_clear():
    d = os.path.join(TMP, "disk-clear")
    s = Server("--disk-tier", d, key="sesame")
    try:
        s.chat(Q1)
        wait_until(lambda: s.tier("disk")["puts"] > 0, "disk writes")
        req = urllib.request.Request(s.url + "/v1/cache/clear", data=b"", method="POST")
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("cache clear without the key was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 401, e.code
        req.add_header("Authorization", "Bearer sesame")
        with urllib.request.urlopen(req, timeout=30) as r:
            report = json.loads(r.read())
        assert report["pool_blocks"] > 0, report
        assert report["tiers"][0]["tier"] == "disk" and report["tiers"][0]["deleted"] > 0, report
        assert disk_blocks(d)["blocks"] == 0
        _, cached = s.chat(Q1)
        assert cached == 0, "nothing left to hit after a clear"
    finally:
        s.stop()
    assert disk_blocks(d)["blocks"] > 0
    out = subprocess.run([BIN, "cache", "clear", "--disk-tier", d], capture_output=True,
                         text=True, check=True)
    assert "deleted" in out.stdout, out.stdout
    assert disk_blocks(d)["blocks"] == 0


def main():
    failures = 0
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v)]
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            print(f"ok   {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:
            failures += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
    shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())

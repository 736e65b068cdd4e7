"""The server against the official `openai` Python client (and raw HTTP where the client cannot
send what we test): chat and completion, streaming and not, n=2, stop strings, usage with
cached_tokens, bad inputs answered with 4xx while serving continues, 32 concurrent streaming
clients equal to the same requests one at a time with no block left in use, and a client that
hangs up mid-stream getting its blocks back.

Run by tests/openai/run (which starts `kvinfer serve`); needs KVINFER_URL.
"""

import concurrent.futures
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

import openai

URL = os.environ["KVINFER_URL"]
client = openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=300)
MODEL = client.models.list().data[0].id
SYSTEM = ("You are a terse assistant for a hardware store. You answer questions about tools, "
          "paint, screws, nails, glue and garden supplies in one or two short sentences, and you "
          "never invent prices. If you do not know, you say so.")


def chat(user, max_tokens=16, temperature=0, **kw):
    return client.chat.completions.create(
        model=MODEL, temperature=temperature, max_tokens=max_tokens,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], **kw)


def stream_text(user, max_tokens=16):
    s = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    text, usage, reasons = "", None, []
    for chunk in s:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, usage, reasons


def raw(path, body, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data if method == "POST" else None, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def declared_only(path, n):
    """Sends only the head of a request declaring an n-byte body; the server must answer at
    once (413) without waiting for the body."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(URL)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def stats():
    return json.loads(raw("/v1/stats", None, "GET")[1])


def wait_idle(timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        s = stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["blocks"]["in_use"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout}s: {stats()}")


def test_chat_and_completion_stream_and_not():
    r = chat("Which glue holds wood best?")
    assert r.choices[0].message.content, r
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, r.usage
    text, usage, reasons = stream_text("Which glue holds wood best?")
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    assert usage.completion_tokens == r.usage.completion_tokens, usage
    assert reasons == [r.choices[0].finish_reason], reasons
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens > 0, c
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert streamed == c.choices[0].text, (streamed, c.choices[0].text)


def test_n_two():
    r = chat("Name a kind of screw.", n=2)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}, r
    assert r.choices[0].message.content == r.choices[1].message.content, "greedy choices differ"
    r = chat("Name a kind of screw.", n=2, temperature=1.0, seed=3, max_tokens=24)
    assert len(r.choices) == 2 and r.usage.completion_tokens >= 2, r


def test_stop_strings():
    full = chat("Describe a hammer.", max_tokens=24).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = words[3]
    r = chat("Describe a hammer.", max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)], (r, full, stop)
    assert r.choices[0].finish_reason == "stop", r


def test_cached_tokens_on_a_repeated_prefix():
    chat("What is a spirit level?", max_tokens=4)
    r = chat("What is a chisel?", max_tokens=4)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached and cached > 0, r.usage
    assert cached < r.usage.prompt_tokens, r.usage


def test_bad_inputs_get_4xx_and_serving_continues():
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("malformed JSON", b'{"messages": [', 400),
        ("missing messages", {"model": MODEL}, 400),
        ("wrong type", {**good, "messages": "hi"}, 400),
        ("negative max_tokens", {**good, "max_tokens": -1}, 400),
        ("absurd max_tokens", {**good, "max_tokens": 10**12}, 400),
        ("prompt over the context", {**good, "messages": [
            {"role": "user", "content": "word " * 20000}]}, 400),
        ("unknown model", {**good, "model": "no-such-model"}, 404),
        ("body over --max-body-bytes", "declared", 413),
    ]
    for what, body, want in cases:
        if body == "declared":
            status, text = declared_only("/v1/chat/completions", 5 << 20)
        else:
            status, text = raw("/v1/chat/completions", body)
        assert status == want, f"{what}: {status} {text[:300]}"
        err = json.loads(text)["error"]
        assert err["message"] and "type" in err and "param" in err and "code" in err, text
        status, text = raw("/v1/chat/completions", good)
        assert status == 200, f"after {what}: {status} {text[:300]}"
    # The client raises typed errors for them.
    try:
        client.chat.completions.create(model=MODEL, max_tokens=-3, messages=good["messages"])
        raise AssertionError("max_tokens -3 accepted")
    except openai.BadRequestError as e:
        assert "max_tokens" in str(e), e
    try:
        client.chat.completions.create(model="gpt-99", max_tokens=2, messages=good["messages"])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass


def test_32_concurrent_streams_equal_one_at_a_time():
    questions = [f"Question {i}: what is item number {i * 7 % 50} in a basic toolbox?"
                 for i in range(32)]
    alone = [stream_text(q)[0] for q in questions]
    before = stats()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda q: stream_text(q)[0], questions))
    diff = [(q, a, b) for q, a, b in zip(questions, alone, together) if a != b]
    assert not diff, f"{len(diff)} outputs differ under batching, e.g. {diff[0]}"
    after = wait_idle()
    assert after["blocks"]["in_use"] == 0, after["blocks"]
    assert after["requests_finished"] - before["requests_finished"] == 32, after
    assert after["prefix"]["hit_tokens"] > before["prefix"]["hit_tokens"], "no prefix reuse"
    # They ran batched: more tokens than forward passes.
    steps = after["steps_total"] - before["steps_total"]
    tokens = after["batch_tokens_total"] - before["batch_tokens_total"]
    assert tokens > 2 * steps, f"{tokens} tokens in {steps} steps: not batched"
    metrics = raw("/metrics", None, "GET")[1]
    assert "kvinfer_kv_blocks_used 0\n" in metrics, metrics


def test_disconnect_mid_stream_frees_blocks():
    before = stats()
    s = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=400, stream=True,
        messages=[{"role": "user", "content": "Write a very long story about a shed."}])
    got = 0
    for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    s.close()
    after = wait_idle()
    assert after["requests_aborted"] > before["requests_aborted"], after
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated < 400, f"the abandoned request ran on: {generated} tokens"


def test_sampling_parameters_change_output_as_they_should():
    def complete(prompt, **kw):
        r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)
        return r.choices[0].text, r
    # logit_bias +100 forces one token: the output is that token's text, over and over.
    forced, _ = complete("The capital of France is", max_tokens=3, logit_bias={"1000": 100},
                         extra_body={"ignore_eos": True})
    unit = forced[: len(forced) // 3]
    assert unit and forced == unit * 3, repr(forced)
    # (-100 banning the greedy token is tested exactly in the engine's tests, where the greedy
    # token's id is known: crates/kvinfer-engine/tests/engine.rs.)
    # A presence penalty changes a repetitive greedy output.
    rep = "one two one two one two one two one two one two one two"
    a, _ = complete(rep, max_tokens=24, extra_body={"ignore_eos": True})
    b, _ = complete(rep, max_tokens=24, presence_penalty=2.0, extra_body={"ignore_eos": True})
    c, _ = complete(rep, max_tokens=24, frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert a != b and a != c, (a, b, c)
    # No seed at temperature 1: the seed drawn is reported and reproduces the sample.
    r1 = chat("Name a tool.", max_tokens=12, temperature=1.0)
    seed = r1.model_extra["seed"]
    assert isinstance(seed, int) and r1.system_fingerprint.startswith("kvinfer-")
    r2 = chat("Name a tool.", max_tokens=12, temperature=1.0, seed=seed)
    assert r2.choices[0].message.content == r1.choices[0].message.content
    assert r1.id != r2.id and r1.id.startswith("chatcmpl-")
    # What is not supported yet is a 400 naming it, never a 200 that ignores it.
    # logprobs: greedy puts the chosen token on top.
    r = chat("Name a tool.", max_tokens=6, logprobs=True, top_logprobs=3)
    for e in r.choices[0].logprobs.content:
        assert e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 3, e
    assert "".join(e.token for e in r.choices[0].logprobs.content) == r.choices[0].message.content
    for kw in [dict(response_format={"type": "yaml"}),
               dict(tool_choice="required"),
               dict(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
               dict(extra_body={"echo": True}),
               dict(extra_body={"best_of": 3}),
               dict(extra_body={"suffix": "x"}),
               dict(extra_body={"functions": [{"name": "f"}]})]:
        try:
            chat("hi", max_tokens=2, **kw)
            raise AssertionError(f"{kw} was accepted")
        except openai.BadRequestError as e:
            name = list(kw.get("extra_body", kw))[0]
            assert name in str(e), str(e)


def health_probe():
    """Seconds one GET /health takes (a fresh connection each time)."""
    t = time.perf_counter()
    with urllib.request.urlopen(URL + "/health", timeout=10) as r:
        r.read()
    return time.perf_counter() - t


def median(xs):
    return sorted(xs)[len(xs) // 2]


def test_overload_400_at_once():
    """400 requests at once: each is answered 200 or the documented 503 (with Retry-After);
    every accepted one finishes; no block leaks. /health is never queued behind the engine: no
    probe takes a second, and their median stays within 10x an idle probe's (at least 50 ms:
    a busy machine slows every probe, not only under overload). The milliseconds are printed:
    a benchmark figure (README, "Under overload"), not a pass mark."""
    import threading
    idle = []
    for _ in range(20):
        idle.append(health_probe())
        time.sleep(0.02)
    body = json.dumps({"model": MODEL, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hi."}]}).encode()
    results = []

    def one(_):
        req = urllib.request.Request(URL + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, None
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After")

    health, done = [], threading.Event()

    def probe():
        while not done.is_set():
            health.append(health_probe())
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=400) as ex:
        results = list(ex.map(one, range(400)))
    done.set()
    prober.join()
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert all(ra == "1" for c, ra in results if c == 503), "503 without Retry-After"
    assert codes.count(200) >= 64, codes.count(200)
    worst, p50, idle_p50 = max(health), median(health), median(idle)
    figures = (f"/health under overload: max {worst * 1000:.1f} ms, p50 {p50 * 1000:.1f} ms over "
               f"{len(health)} probes; idle p50 {idle_p50 * 1000:.1f} ms")
    assert worst < 1.0, f"a probe took over a second: {figures}"
    assert p50 <= max(10 * idle_p50, 0.05), f"/health queued behind the engine? {figures}"
    after = wait_idle()
    assert after["blocks"]["in_use"] == 0, after["blocks"]
    print(f"     overload: {codes.count(200)} served, {codes.count(503)} x 503 in "
          f"{time.time() - t0:.1f} s; {figures}")


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_")]
    failed = 0
    for name, f in tests:
        t = time.time()
        try:
            f()
            print(f"ok   {name} ({time.time() - t:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t:.1f}s)", flush=True)
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

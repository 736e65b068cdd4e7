"""Structured output and tool calling against a real `kvinfer serve`, through the official
`openai` client: 20 varied JSON schemas, each alone and then 16 at once (the second pass also
hits the prefix cache), every answer validated with `jsonschema`; tool calls forced and named,
streamed and not, and a full round trip (call, tool result, final answer).

With --bench it also times constrained against free decoding side by side and prints the mask
cost per token (bench/structured runs it that way).

Run by tests/openai/run; needs KVINFER_URL.
"""

import concurrent.futures
import json
import os
import sys
import time
import traceback
import urllib.request

import jsonschema
import openai

URL = os.environ["KVINFER_URL"]
client = openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=600)
MODEL = client.models.list().data[0].id

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    ("person", {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"], "additionalProperties": False}),
    ("colour", {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
                "required": ["colour"], "additionalProperties": False}),
    ("flag", {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}),
    ("list", {"type": "object", "properties": {"items": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
              "required": ["items"], "additionalProperties": False}),
    ("point", {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                 "y": {"type": "number", "minimum": -10, "maximum": 10}},
               "required": ["x", "y"], "additionalProperties": False}),
    ("nested", {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": S},
                                                          "required": ["id", "email"], "additionalProperties": False}},
                "required": ["user"], "additionalProperties": False}),
    ("optional", {"type": "object", "properties": {"title": S, "subtitle": S}, "required": ["title"],
                  "additionalProperties": False}),
    ("date", {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
              "required": ["date"], "additionalProperties": False}),
    ("nullable", {"type": "object", "properties": {"note": {"anyOf": [S, {"type": "null"}]}},
                  "required": ["note"], "additionalProperties": False}),
    ("const", {"type": "object", "properties": {"version": {"const": 2}, "name": S},
               "required": ["version", "name"], "additionalProperties": False}),
    ("matrix", {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 2, "items": {
                   "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
                "required": ["rows"], "additionalProperties": False}),
    ("oneof", {"type": "object", "properties": {"shape": {"oneOf": [
                   {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["kind", "r"], "additionalProperties": False},
                   {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["kind", "side"], "additionalProperties": False}]}},
               "required": ["shape"], "additionalProperties": False}),
    ("refs", {"$defs": {"tag": {"type": "string", "enum": ["a", "b", "c"]}}, "type": "object",
              "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}},
              "required": ["tags"], "additionalProperties": False}),
    ("product", {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                   "price": {"type": "number", "minimum": 0, "maximum": 1000},
                                                   "stock": {"type": "integer", "minimum": 0, "maximum": 100}},
                 "required": ["sku", "price", "stock"], "additionalProperties": False}),
    ("answer", {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["answer", "confidence"], "additionalProperties": False}),
    ("address", {"type": "object", "properties": {"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["street", "city", "zip"], "additionalProperties": False}),
    ("scores", {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 2, "maxItems": 4}},
                "required": ["scores"], "additionalProperties": False}),
    ("event", {"type": "object", "properties": {"name": S, "attendees": {"type": "array", "maxItems": 2, "items": {
                   "type": "object", "properties": {"name": S, "vip": {"type": "boolean"}}, "required": ["name", "vip"], "additionalProperties": False}}},
               "required": ["name", "attendees"], "additionalProperties": False}),
    ("top_array", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 5}),
    ("weather", {"type": "object", "properties": {"city": S, "temp_c": {"type": "integer", "minimum": -40, "maximum": 50},
                                                  "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
                 "required": ["city", "temp_c", "sky"], "additionalProperties": False}),
]
assert len(SCHEMAS) == 20


def ask(name, schema, temperature=0.7, seed=1, max_tokens=250):
    r = client.chat.completions.create(
        model=MODEL, temperature=temperature, seed=seed, max_tokens=max_tokens,
        messages=[{"role": "system", "content": "You answer in JSON."},
                  {"role": "user", "content": f"Give me an example {name} as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}})
    c = r.choices[0]
    assert c.finish_reason == "stop", (name, c.finish_reason, c.message.content)
    value = json.loads(c.message.content)
    jsonschema.validate(value, schema)
    return c.message.content


def stats():
    with urllib.request.urlopen(URL + "/v1/stats", timeout=30) as r:
        return json.loads(r.read())


def test_20_schemas_alone_then_16_at_once():
    before = stats()["grammar"]
    alone = {name: ask(name, schema) for name, schema in SCHEMAS}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = {name: pool.submit(ask, name, schema) for name, schema in SCHEMAS[:16]}
        batched = {name: f.result() for name, f in futures.items()}
    after = stats()
    # Same seed, same prompt: the same sample batched (and from the prefix cache) as alone.
    for name in batched:
        assert batched[name] == alone[name], (name, alone[name], batched[name])
    g = after["grammar"]
    n, s = g["count"] - before.get("count", 0), g["sum"] - before.get("sum", 0.0)
    assert n > 0
    print(f"     mask: {n} constrained tokens, mean {s / n * 1e6:.0f} us per token")


def test_json_object_mode():
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON with a name and a colour."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                       "required": ["zone"], "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(name, arguments):
    assert name in SCHEMA_OF, name
    jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])


def test_tool_call_round_trip():
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=QUESTION,
                                       tools=TOOLS, tool_choice="required")
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None, c.message
    assert len(c.message.tool_calls) >= 1
    call = c.message.tool_calls[0]
    check_call(call.function.name, call.function.arguments)
    # The result goes back; the model answers in text.
    follow = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temp_c": 21})},
    ]
    r2 = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, messages=follow,
                                        tools=TOOLS, tool_choice="none")
    assert r2.choices[0].message.tool_calls is None
    assert r2.choices[0].message.content, r2
    # Named: exactly that function.
    r3 = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=QUESTION,
                                        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        parallel_tool_calls=False)
    calls = r3.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time", r3
    check_call("get_time", calls[0].function.arguments)


def test_named_tool_choice_is_one_call_and_no_markup():
    """A named tool_choice (parallel_tool_calls left at its default) is exactly one call: the
    grammar ends after it. No call text, complete or cut, ever goes into content."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for max_tokens in (64, 200):
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                           messages=QUESTION, tools=TOOLS, tool_choice=named)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", (max_tokens, c)
        assert len(c.message.tool_calls) == 1, (max_tokens, c.message.tool_calls)
        assert c.message.tool_calls[0].function.name == "get_weather"
        assert not c.message.content, (max_tokens, c.message.content)
    # Cut by the length limit mid-call: the cut call is not content.
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=QUESTION,
                                       tools=TOOLS, tool_choice=named)
    c = r.choices[0]
    assert c.finish_reason == "length", c
    assert "<tool_call" not in (c.message.content or ""), c.message.content


def test_tool_call_streamed():
    s = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=QUESTION,
                                       tools=TOOLS, tool_choice="required", stream=True)
    calls, content, reason = {}, "", None
    for chunk in s:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            reason = c.finish_reason or reason
    assert reason == "tool_calls", reason
    assert content == "", content
    assert calls, "no tool call streamed"
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        check_call(entry["name"], entry["arguments"])
    # The same call as without streaming.
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=QUESTION,
                                       tools=TOOLS, tool_choice="required")
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == \
        [(e["name"], e["arguments"]) for _, e in sorted(calls.items())]


def bench():
    """Constrained and free decoding side by side: same prompt, greedy, ignore_eos, N tokens."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
              "required": ["items"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "List many hardware store items as JSON."}]
    tokens = 200

    def one(constrained):
        kw = {"response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": schema}}} if constrained else {}
        t = time.perf_counter()
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=tokens, messages=msgs,
                                           extra_body={"ignore_eos": True}, **kw)
        return time.perf_counter() - t, r.usage.completion_tokens

    t_end = time.time() + 30  # warm the CPU up
    while time.time() < t_end:
        one(False)
    free, cons = [], []
    before = stats()["grammar"]
    for _ in range(5):
        free.append(one(False))
        cons.append(one(True))
    after = stats()["grammar"]
    n, s = after["count"] - before["count"], after["sum"] - before["sum"]
    ms = lambda runs: 1e3 * sum(t for t, _ in runs) / sum(k for _, k in runs)
    result = {"model": MODEL, "tokens_per_request": tokens, "runs": 5,
              "free_ms_per_token": round(ms(free), 3), "constrained_ms_per_token": round(ms(cons), 3),
              "mask_us_per_token": round(s / n * 1e6, 1), "constrained_tokens_measured": n}
    result["overhead_pct"] = round(100 * (result["constrained_ms_per_token"] / result["free_ms_per_token"] - 1), 1)
    print(json.dumps(result, indent=2))


def main():
    if "--bench" in sys.argv:
        bench()
        return 0
    failed = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            t = time.time()
            try:
                fn()
                print(f"ok   {name} ({time.time() - t:.1f} s)")
            except Exception:
                failed += 1
                print(f"FAIL {name}")
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Drives the relay with the official `openai` package, as a customer's app would.

Reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment (the SDK does this itself), runs a
plain and a streaming chat completion against the `budget` tier, and prints one JSON line with
what it saw. Exits non-zero if anything is off.
"""

import json
import sys

import openai

client = openai.OpenAI()

plain = client.chat.completions.create(
    model="budget",
    messages=[{"role": "user", "content": "Say ok in one word."}],
    max_tokens=50,
)
assert plain.choices[0].message.content, plain
assert plain.usage is not None and plain.usage.completion_tokens > 0, plain.usage

chunks = []
usage = None
stream = client.chat.completions.create(
    model="budget",
    messages=[{"role": "user", "content": "Say ok in one word."}],
    max_tokens=50,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        chunks.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage

assert chunks, "the stream carried no content"
assert usage is not None and usage.completion_tokens > 0, usage

try:
    client.chat.completions.create(model="no-such-tier", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    not_found_code = e.code

bad = openai.OpenAI(api_key="sk-relay_" + "0" * 40)
try:
    bad.chat.completions.create(model="budget", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("a bad key must fail")
except openai.AuthenticationError as e:
    auth_code = e.code

json.dump(
    {
        "plain": plain.choices[0].message.content,
        "plain_usage": plain.usage.completion_tokens,
        "stream": "".join(chunks),
        "stream_chunks": len(chunks),
        "stream_usage": usage.completion_tokens,
        "not_found_code": not_found_code,
        "auth_code": auth_code,
    },
    sys.stdout,
)
print()

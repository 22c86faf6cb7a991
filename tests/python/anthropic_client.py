"""Drives the relay with the official `anthropic` package, as an app built for Claude would.

Reads ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY from the environment (the SDK does this itself),
runs a message, a streamed message and a streamed tool use against the `claude` tier (an
Anthropic upstream, so the Messages API passes through), and prints one JSON line with what it
saw. Exits non-zero if anything is off.
"""

import json
import sys

import anthropic

client = anthropic.Anthropic()

plain = client.messages.create(
    model="claude",
    max_tokens=100,
    stop_sequences=["END"],
    messages=[{"role": "user", "content": "Say hello."}],
)
assert plain.id.startswith("msg_") and not plain.id.startswith("msg_msg_"), plain.id

with client.messages.stream(
    model="claude_crlf",
    max_tokens=100,
    messages=[{"role": "user", "content": "Say hello."}],
) as stream:
    text = "".join(stream.text_stream)
    streamed = stream.get_final_message()

with client.messages.stream(
    model="claude",
    max_tokens=200,
    tools=[
        {
            "name": "get_weather",
            "description": "The weather in a location.",
            "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
        }
    ],
    messages=[{"role": "user", "content": "Weather in San Francisco?"}],
) as stream:
    tooled = stream.get_final_message()
tool_uses = [b for b in tooled.content if b.type == "tool_use"]
assert tool_uses, tooled

try:
    anthropic.Anthropic(api_key="sk-relay_" + "0" * 40).messages.create(
        model="claude", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    raise AssertionError("a bad key must fail")
except anthropic.AuthenticationError as e:
    auth_type = e.body["error"]["type"]

json.dump(
    {
        "id": plain.id,
        "model": plain.model,
        "text": plain.content[0].text,
        "stop_reason": plain.stop_reason,
        "stop_sequence": plain.stop_sequence,
        "usage": [plain.usage.input_tokens, plain.usage.output_tokens],
        "stream_text": text,
        "stream_id": streamed.id,
        "stream_usage": [streamed.usage.input_tokens, streamed.usage.output_tokens],
        "tool": tool_uses[0].name,
        "tool_input": tool_uses[0].input,
        "tool_stop": tooled.stop_reason,
        "auth_type": auth_type,
    },
    sys.stdout,
)
print()

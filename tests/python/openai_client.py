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

# The Responses API, translated to the tier's chat upstream: text, then a function tool.
answer = client.responses.create(model="budget", instructions="Be brief.", input="Say ok.")
assert answer.status == "completed", answer
weather = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
called = client.responses.create(
    model="budget", input="Weather in Paris?", tools=[weather], tool_choice="required"
)
calls = [o for o in called.output if o.type == "function_call"]
assert calls and calls[0].name == "weather", called
assert json.loads(calls[0].arguments) == {"city": "Paris"}, calls[0]

kinds = []
final = None
args = ""
for event in client.responses.create(
    model="budget", input="Weather in Paris?", tools=[weather], tool_choice="required", stream=True
):
    kinds.append(event.type)
    if event.type == "response.function_call_arguments.delta":
        args += event.delta
    if event.type == "response.completed":
        final = event.response
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert json.loads(args) == {"city": "Paris"}, args
assert final.output[0].type == "function_call" and final.usage.output_tokens > 0, final

with client.responses.stream(model="budget", input="Say ok.") as s:
    streamed_text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    streamed_final = s.get_final_response()

try:
    client.responses.create(model="budget", input="x", previous_response_id="resp_123")
    raise AssertionError("previous_response_id must be refused")
except openai.BadRequestError as e:
    previous_param = e.param

model = client.models.retrieve("budget")

# Embeddings: floats as asked, and the SDK's default (base64, decoded by the SDK).
floats = client.embeddings.create(model="embed", input=["a", "b"], encoding_format="float", dimensions=3)
assert [d.embedding for d in floats.data] == [[0.0, 0.125, 0.25]] * 2, floats
decoded = client.embeddings.create(model="embed", input="a")
assert list(decoded.data[0].embedding) == [0.0, 0.125, 0.25, 0.375], decoded
assert floats.usage.prompt_tokens == 6 and decoded.usage.prompt_tokens == 3

json.dump(
    {
        "responses_text": answer.output_text,
        "responses_model": answer.model,
        "responses_stream_text": streamed_text,
        "responses_stream_final": streamed_final.output_text,
        "previous_param": previous_param,
        "retrieved": model.id,
        "embeddings_model": floats.model,
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

"""Tool calling through the proxy: the call, the round trip with its result, and streamed calls."""

import json

MODEL = "test/model"
ASK = [{"role": "user", "content": "What is the weather?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def test_model_calls_the_tool(client):
    completion = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "sim"}


def test_tool_result_round_trip_gets_a_text_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    message = first.choices[0].message
    [call] = message.tool_calls

    followup = ASK + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=followup, tools=TOOLS)

    choice = answer.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert not choice.message.tool_calls
    assert choice.message.content


def test_streamed_tool_call_accumulates_to_the_same_call(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True)

    calls = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            if delta.function:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish

    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "sim"}

"""The official Anthropic SDK against tollgate's /v1/messages, served by OpenAI-only replicas."""

import json

import anthropic
import pytest

from conftest import MAX_BODY_BYTES

MODEL = "test/model"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def ask(text="Hello"):
    return [{"role": "user", "content": text}]


def test_messages_create_returns_a_typed_message(anthropic_client):
    m = anthropic_client.messages.create(model=MODEL, max_tokens=5, messages=ask())
    assert m.id.startswith("msg_")
    assert m.role == "assistant"
    assert m.model == MODEL
    assert m.content[0].type == "text"
    assert m.content[0].text == "The quick brown fox jumps"
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 5
    assert m.usage.input_tokens > 0


def test_a_natural_end_is_end_turn_and_system_prompts_work(anthropic_client):
    m = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=50,
        system="Be brief.",
        messages=ask(),
        extra_body={"sim": {"tokens": 3}},
    )
    assert m.stop_reason == "end_turn"
    assert m.content[0].text == "The quick brown"


def test_messages_stream_gives_text_final_message_and_usage(anthropic_client):
    with anthropic_client.messages.stream(model=MODEL, max_tokens=6, messages=ask()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "The quick brown fox jumps over"
    assert final.content[0].text == text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6
    assert final.usage.input_tokens > 0


def test_a_reasoning_model_shows_thinking_only_when_asked(anthropic_client):
    # The replica's model reasons by default, as Qwen3 does.
    reasons = {"sim": {"reasoning_tokens": 3}}
    m = anthropic_client.messages.create(
        model=MODEL, max_tokens=8, messages=ask(), extra_body=reasons
    )
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text
    m = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=ask(),
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body=reasons,
    )
    assert [b.type for b in m.content] == ["thinking", "text"]
    with anthropic_client.messages.stream(
        model=MODEL, max_tokens=8, messages=ask(), extra_body=reasons
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"]


def test_an_assistant_prefill_is_continued(anthropic_client):
    m = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=ask("Name a colour as JSON.") + [{"role": "assistant", "content": '{"colour": "'}],
    )
    assert m.content[0].type == "text"
    assert m.stop_reason == "max_tokens"


def test_tool_use_round_trip(anthropic_client):
    first = anthropic_client.messages.create(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=ask("Weather in Paris?")
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather"
    assert call.input == {"city": "sim"}
    second = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=8,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.content[0].type == "text"
    assert second.stop_reason in ("end_turn", "max_tokens")


def test_a_streamed_tool_call_ends_with_tool_use(anthropic_client):
    with anthropic_client.messages.stream(
        model=MODEL, max_tokens=64, tools=[WEATHER], messages=ask("Weather?")
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.input == {"city": "sim"}


def test_count_tokens(anthropic_client):
    short = anthropic_client.messages.count_tokens(model=MODEL, messages=ask("Hello"))
    long = anthropic_client.messages.count_tokens(model=MODEL, messages=ask("Hello " * 400))
    assert 0 < short.input_tokens < long.input_tokens


def test_a_wrong_key_is_an_authentication_error(make_anthropic):
    with pytest.raises(anthropic.AuthenticationError) as e:
        make_anthropic("tg-wrong").messages.create(model=MODEL, max_tokens=5, messages=ask())
    assert e.value.status_code == 401
    assert e.value.body["error"]["type"] == "authentication_error"


def test_an_unknown_model_is_not_found(anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as e:
        anthropic_client.messages.create(model="no/such-model", max_tokens=5, messages=ask())
    assert e.value.body["error"]["type"] == "not_found_error"


def test_an_oversized_body_is_413(anthropic_client):
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic_client.messages.create(model=MODEL, max_tokens=5, messages=ask("x" * (MAX_BODY_BYTES + 1)))
    assert e.value.status_code == 413
    assert e.value.body["error"]["type"] == "request_too_large"


def test_a_replica_error_arrives_in_anthropic_shape(anthropic_client):
    with pytest.raises(anthropic.InternalServerError) as e:
        anthropic_client.messages.create(
            model=MODEL, max_tokens=5, messages=ask(), extra_body={"sim": {"fail_status": 500}}
        )
    assert e.value.body["type"] == "error"
    assert "simulated failure" in json.dumps(e.value.body)

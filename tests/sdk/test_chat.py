"""Non-streamed chat completions as the openai SDK returns them."""

MODEL = "test/model"
WORDS = "The quick brown fox jumps over the lazy dog".split()
HELLO = [{"role": "user", "content": "Say something."}]


def expected_text(n):
    """The first `n` words the simulated replica produces, cycling."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def test_without_max_tokens_the_models_default_cap_applies(client):
    # test/model sets default_max_tokens = 20 (the simulated replica alone would write 16).
    completion = client.chat.completions.create(model=MODEL, messages=HELLO)

    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(20)
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_caps_the_completion(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)

    assert completion.choices[0].message.content == expected_text(5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_natural_end_reports_stop(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=HELLO, extra_body={"sim": {"tokens": 3}}
    )

    assert completion.choices[0].message.content == expected_text(3)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 3


def test_unknown_request_fields_pass_through(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=HELLO, extra_body={"top_k": 5}
    )

    assert completion.choices[0].message.content


def test_second_model_is_served(client, narrow_client):
    for c in (client, narrow_client):
        completion = c.chat.completions.create(model="test/other", messages=HELLO, max_tokens=2)
        assert completion.choices[0].message.content == expected_text(2)


def test_raw_response_carries_a_request_id(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)

    assert raw.status_code == 200
    assert raw.headers.get("x-request-id")
    assert raw.parse().choices[0].message.content

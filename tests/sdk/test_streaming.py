"""Streamed chat completions: chunk text, the optional usage chunk, a replica reset mid-stream."""

import openai
import pytest

MODEL = "test/model"
WORDS = "The quick brown fox jumps over the lazy dog".split()
HELLO = [{"role": "user", "content": "Say something."}]


def expected_text(n):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def test_stream_without_usage_option_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(20)
    assert all(c.usage is None for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop")
    assert all(f is None for f in finishes[:-1])


def test_stream_with_include_usage_ends_with_a_usage_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    *body, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == expected_text(7)
    assert last.choices == []
    assert last.usage.completion_tokens == len(text.split()) == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in body)


def test_stream_chunks_share_one_id(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True)
    )

    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_replica_reset_mid_stream_raises(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        extra_body={"sim": {"reset_after": 2}},
    )

    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    # What arrived before the reset is the start of the answer, never a complete one.
    assert expected_text(20).startswith("".join(received))
    assert "".join(received) != expected_text(20)

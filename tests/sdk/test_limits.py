"""Rate limits and budgets as both SDKs see them: typed errors and rate-limit headers."""

import anthropic
import openai
import pytest

from conftest import BROKE_KEY, LIMITED_KEY

MODEL = "test/model"
MESSAGES = [{"role": "user", "content": "Hello"}]


def test_rate_limits_raise_the_typed_error_in_both_sdks(make_client, make_anthropic):
    # One request per minute for this key: the first passes, the next ones are refused.
    ok = make_client(LIMITED_KEY).chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=3, messages=MESSAGES
    )
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(openai.RateLimitError) as e:
        make_client(LIMITED_KEY).chat.completions.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.code == "rate_limit_requests"
    with pytest.raises(anthropic.RateLimitError) as e:
        make_anthropic(LIMITED_KEY).messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert e.value.body["error"]["type"] == "rate_limit_error"


def test_an_exhausted_budget_is_a_402_typed_error_in_both_sdks(make_client, make_anthropic):
    with pytest.raises(openai.APIStatusError) as e:
        make_client(BROKE_KEY).chat.completions.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert e.value.status_code == 402
    assert e.value.code == "budget_exceeded"
    with pytest.raises(anthropic.APIStatusError) as e:
        make_anthropic(BROKE_KEY).messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert e.value.status_code == 402
    assert e.value.body["error"]["type"] == "billing_error"

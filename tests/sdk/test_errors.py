"""Errors reach the SDK as its typed exceptions, with an OpenAI error code and a request id."""

import openai
import pytest

MODEL = "test/model"
HELLO = [{"role": "user", "content": "Say something."}]


def error_code(e):
    """The `code` of an OpenAI error body; the SDK unwraps `{"error": {...}}` into `e.body`."""
    return e.code or (e.body or {}).get("code")


def assert_request_id(e):
    assert e.response.headers.get("x-request-id"), "error response has no x-request-id"


def test_wrong_key_is_an_authentication_error(make_client):
    with pytest.raises(openai.AuthenticationError) as caught:
        make_client("tg-not-a-key").chat.completions.create(model=MODEL, messages=HELLO)

    assert caught.value.status_code == 401
    assert error_code(caught.value) == "invalid_api_key"
    assert_request_id(caught.value)


def test_wrong_key_cannot_list_models(make_client):
    with pytest.raises(openai.AuthenticationError) as caught:
        make_client("tg-not-a-key").models.list()

    assert_request_id(caught.value)


def test_model_outside_the_key_scope_is_permission_denied(narrow_client):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        narrow_client.chat.completions.create(model=MODEL, messages=HELLO)

    assert caught.value.status_code == 403
    assert_request_id(caught.value)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="test/missing", messages=HELLO)

    assert caught.value.status_code == 404
    assert error_code(caught.value) == "model_not_found"
    assert_request_id(caught.value)


def test_oversized_body_is_413(client):
    # 100 KB of text against the suite's 64 KiB cap.
    big = [{"role": "user", "content": "x" * 100_000}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=big)

    assert caught.value.status_code == 413
    assert error_code(caught.value) == "request_too_large"
    assert_request_id(caught.value)


def test_replica_failure_is_an_internal_server_error(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"sim": {"fail_status": 500}}
        )

    assert caught.value.status_code == 500
    assert_request_id(caught.value)


def test_streamed_request_failing_upfront_raises_before_any_chunk(client):
    with pytest.raises(openai.InternalServerError) as caught:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            stream=True,
            extra_body={"sim": {"fail_status": 500}},
        )
        next(iter(stream))

    assert_request_id(caught.value)


def test_an_output_cap_of_zero_is_a_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_completion_tokens=0, max_tokens=500
        )

    assert caught.value.status_code == 400
    assert error_code(caught.value) == "invalid_value"
    assert caught.value.param == "max_completion_tokens"
    assert_request_id(caught.value)

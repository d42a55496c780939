"""The model catalogue as the SDK reads it: order, hosted-API extensions, slugs with a slash."""

import openai
import pytest


def test_list_returns_configured_models_in_order(client):
    ids = [m.id for m in client.models.list()]

    assert ids == ["test/model", "test/other"]


def test_list_exposes_context_length_and_per_token_prices(client):
    model = next(m for m in client.models.list() if m.id == "test/model")

    assert model.object == "model"
    assert model.context_length == 32768
    assert model.model_extra["max_completion_tokens"] == 4096
    assert model.pricing["prompt"] == "0.0000005"
    assert model.pricing["completion"] == "0.0000015"
    assert model.pricing["input_cache_read"] == "0.0000001"
    assert model.supported_features == ["tools", "json_mode"]


def test_retrieve_a_slug_with_a_slash(client):
    model = client.models.retrieve("test/model")

    assert model.id == "test/model"
    assert model.context_length == 32768


def test_list_shows_only_models_the_key_may_use(narrow_client):
    assert [m.id for m in narrow_client.models.list()] == ["test/other"]


def test_retrieve_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("test/missing")


def test_retrieve_a_model_the_key_may_not_use_is_not_found(narrow_client):
    with pytest.raises(openai.NotFoundError):
        narrow_client.models.retrieve("test/model")

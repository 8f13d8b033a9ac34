"""The HTTP layer's fixtures: the app over a fake engine, and the official client on top."""
from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient

from runtime.serve.app import create_app
from runtime.serve.metrics import Metrics
from tests.runtime.serve.fake_engine import FakeEngine

MODEL, KEY = "tiny-chat", "sk-test"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def http(engine, metrics):
    app = create_app(engine, served_model_name=MODEL, api_key=KEY, metrics=metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(http) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429s and hide them from the test.
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http,
                         max_retries=0)



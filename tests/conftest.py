"""Fixtures shared by every test layer."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Broker, broker_kind, start_mosquitto, start_shoal

LOOPS = ["uvloop", "asyncio"]
_ids = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shoal_only: behaviour Mosquitto does not share")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if broker_kind() != "mosquitto":
        return
    skip = pytest.mark.skip(reason="shoal-specific behaviour")
    for item in items:
        if "shoal_only" in item.keywords:
            item.add_marker(skip)


def _params() -> list[str]:
    return LOOPS if broker_kind() == "shoal" else ["mosquitto"]


@pytest.fixture(scope="module", params=_params())
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _start(workdir: Path, loop: str, config: dict[str, Any] | None) -> Broker:
    if broker_kind() == "mosquitto":
        if config:
            pytest.skip("config overrides are shoal-specific")
        return start_mosquitto(workdir)
    return start_shoal(workdir, config, loop=loop)


def _finish(b: Broker) -> None:
    code = b.stop()
    errors = b.unhandled_errors()
    assert not errors, f"broker logged unhandled errors {errors}:\n{b.log()[-4000:]}"
    if b.kind == "shoal":
        assert code == 0, f"broker exited with {code}:\n{b.log()[-4000:]}"


@pytest.fixture(scope="module")
def broker(loop_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker shared by a test module (tests use unique client ids and topics)."""
    b = _start(tmp_path_factory.mktemp("broker"), loop_name, None)
    try:
        yield b
    finally:
        _finish(b)


@pytest.fixture
def make_broker(loop_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    """Start a broker with config overrides: ``make_broker({"mqtt": {...}})``."""
    started: list[Broker] = []

    def make(config: dict[str, Any] | None = None) -> Broker:
        b = _start(tmp_path_factory.mktemp("broker"), loop_name, config)
        started.append(b)
        return b

    yield make
    for b in started:
        _finish(b)


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test, for client ids and topics."""
    return f"t{os.getpid()}x{next(_ids)}"

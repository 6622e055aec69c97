"""Fixtures for the integration tests that need more than a broker."""

from __future__ import annotations

import pytest

from tests.integration.pki import PKI, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a server certificate for localhost/127.0.0.1 and client certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"))

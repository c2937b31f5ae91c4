"""Security fixtures: the integration suite's gateway and audit trail."""

from __future__ import annotations

from tests.integration.conftest import audit, start_gateway  # noqa: F401  (shared fixtures)

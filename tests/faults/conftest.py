"""Fault-injection fixtures: the integration suite's gateway and audit trail, a sandbox whose
faults are replaced as a whole (so a seed takes effect), and the real gateway as a process."""

from __future__ import annotations

from tests.integration.conftest import audit, start_gateway  # noqa: F401  (shared fixtures)

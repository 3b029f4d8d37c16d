from __future__ import annotations

from tests.e2e.conftest import daemon

__all__ = ["daemon"]

"""kore-session-gateway: closes Kore.ai bot sessions on behalf of internal callers."""

__version__ = "0.1.0"

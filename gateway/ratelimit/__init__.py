"""The rate-limit wing: Kore.ai's per-bot windows, in memory (`memory`) or shared in Redis (`redis`).

No HTTP.
"""

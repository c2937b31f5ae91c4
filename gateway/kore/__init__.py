"""The Kore.ai wing: JWT minting and caching (`tokens`) and the upstream PUT (`client`).

The only wing that talks to Kore.ai.
"""

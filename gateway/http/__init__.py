"""The HTTP wing: the aiohttp server, its routes and middlewares, the runtime it serves from.

The only wing that knows aiohttp's server. Its `__init__` imports nothing, so that the light
`python -m gateway.http.healthcheck` probe stays light.
"""

"""The configuration wing: `model` (dataclasses), `toml` (typed table access), `tables` (checks),
`loader` (`load_config`, the one way in). It imports nothing of the gateway outside itself.
"""

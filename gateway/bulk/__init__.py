"""The bulk wing: `kore-gateway deactivate`, a client of the gateway's HTTP API only.

`rows` reads and writes the CSV files, `sender` sends them, `progress` shows it, `cli` wires it.
"""

"""The sandbox wing: a local emulator of Kore.ai's session API (`server`, `jwt`, `faults`, `cli`).

It shares no code with `gateway.kore`, because it is what checks that code.
"""

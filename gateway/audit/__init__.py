"""The audit wing: the durable JSON Lines log (`log`) and its writer thread (`writer`), its
hash chain (`chain`), its files (`files`).

It never sees a JWT, a key, or HTTP.
"""

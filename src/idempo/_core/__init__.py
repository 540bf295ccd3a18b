"""The sans-I/O core: key parsing, fingerprint, records, policy and the protocol flow.

Nothing here imports asyncio, a store client or a web framework, and nothing
here does I/O; stores and adapters sit on top.
"""

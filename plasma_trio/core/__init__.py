"""Pure protocol logic: no I/O, no clock, no trio.

Everything here is a plain function over immutable values, so it can be
tested fast and exhaustively (see ``tests/test_core_*.py``).
"""

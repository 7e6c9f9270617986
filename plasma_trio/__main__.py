"""``python -m plasma_trio`` is the ``plasma-trio`` command."""

from plasma_trio.cli import main

if __name__ == "__main__":
    main()

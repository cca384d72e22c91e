"""``python -m machinedpy_cli``: the same as the ``machined-py`` command."""

import sys

from machinedpy_cli.main import main

if __name__ == "__main__":
    sys.exit(main())

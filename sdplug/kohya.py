"""``python -m sdplug.kohya`` (e.g. under ``accelerate launch -m sdplug.kohya``): see sdplug.hosts.kohya.launcher."""

import sys

from sdplug.hosts.kohya.launcher import main

if __name__ == "__main__":
    sys.exit(main())

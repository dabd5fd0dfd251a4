import sys

from sdplug.cli import main

sys.exit(main())

"""``python -m traintel``."""

import sys

from traintel.cli import main

sys.exit(main())

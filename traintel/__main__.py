"""``python -m traintel``."""

import sys

from traintel.cli.main import main

sys.exit(main())

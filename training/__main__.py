"""``python -m jrs.training``: train (the options of ``jrs train``; see `launch`)."""

import sys

from jrs.training.launch import main

sys.exit(main())

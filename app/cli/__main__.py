"""`python -m app.cli ...`: the `polar` command."""

import sys

from app.cli.main import main

sys.exit(main())

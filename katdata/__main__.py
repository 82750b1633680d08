import sys

from katdata.cli import main

sys.exit(main())

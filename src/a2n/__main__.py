import sys

from a2n.cli import main

sys.exit(main())

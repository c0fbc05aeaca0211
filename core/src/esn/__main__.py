import sys

from esn.cli import main

sys.exit(main())

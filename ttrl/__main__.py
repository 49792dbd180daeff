import sys

from ttrl.cli import main

sys.exit(main())

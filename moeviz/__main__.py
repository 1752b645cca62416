import sys

from moeviz.cli import main

sys.exit(main())

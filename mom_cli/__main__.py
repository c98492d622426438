import sys

from mom_cli.cli.app import main

sys.exit(main())

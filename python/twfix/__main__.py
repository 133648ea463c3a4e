import sys

from twfix.cli import main

sys.exit(main())

import sys

from vlpretrain.cli import main

sys.exit(main())

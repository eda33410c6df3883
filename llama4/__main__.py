import sys

from llama4.cli import main

sys.exit(main())

"""`python -m proxy`, the same as the `publer-proxy` command."""

import sys

from proxy.launch import main

sys.exit(main())

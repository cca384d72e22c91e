"""The helper that reads a raw image's metadata (see imagepool.rawmeta)."""

import sys

from imagepool.rawmeta.dissect import main

sys.exit(main())

"""``python -m watcher`` is ``xray-watcher``."""

from watcher.cli import main

raise SystemExit(main())

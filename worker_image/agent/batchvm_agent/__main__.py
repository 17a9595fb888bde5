"""``python -m batchvm_agent``."""

from .main import main

raise SystemExit(main())

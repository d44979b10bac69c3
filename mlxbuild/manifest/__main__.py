"""``python -m mlxbuild.manifest``: the same as ``mlxbuild schema`` / ``mlxbuild validate``."""

from mlxbuild.cli import manifest_main

raise SystemExit(manifest_main())

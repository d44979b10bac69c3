#!/usr/bin/env bash
# Regenerate requirements/lock.txt: every package `pip install -e '.[test]'` pulls in, at exact
# versions, resolved by pip-tools from pyproject.toml (the test extra included) and hold.txt.
# pip-compile, not uv: uv does not see the CPU torch wheel pip finds through its find-links and
# would resolve a CUDA build. Resolution honours this machine's pip configuration (indexes,
# find-links, the global constraints file), as the install does.
#
#   requirements/regen.sh                       re-resolve only what changed in pyproject.toml
#   requirements/regen.sh --upgrade             move everything to the newest the ranges allow
#   requirements/regen.sh -P boto3==1.45.0      move one package
#
# Then install from the new lock in a fresh venv and run the tests (docs/toolchain.md).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q 'pip-tools==7.6.2'
"$tools/venv/bin/pip-compile" --quiet --resolver=backtracking --extra test --strip-extras \
    --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --constraint requirements/hold.txt --output-file requirements/lock.txt "$@" pyproject.toml
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)"

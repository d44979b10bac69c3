#!/usr/bin/env bash
# The latest-dependencies lane: what a user gets who installs from pyproject.toml alone, with the
# newest release every range allows, not the lock. In a fresh venv (kept in $LANE_DIR, default a
# temporary folder): install, `mlxbuild doctor`, the default build, a quick subset of the tests,
# and which packages differ from requirements/lock.txt. Exit 0 when doctor, build and tests pass
# (drift from the lock is reported, not failed: finding it is the lane's purpose).
#
#   requirements/latest-lane.sh                  the whole lane (about 6 minutes on 2 cores)
#   LANE_TESTS="tests/test_manifest.py" requirements/latest-lane.sh
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
lane=${LANE_DIR:-$(mktemp -d)}
mkdir -p "$lane"
tests=${LANE_TESTS:-"tests/test_toolchain.py tests/test_manifest.py tests/test_pte_inspect.py tests/test_readme.py"}
# Checks that hold only in the locked environment.
deselect="not running_environment_is_the_lock and not clean_in_the_locked_environment"
status=0
step() { echo; echo "== $*"; }

step "install from pyproject.toml alone (newest allowed) into $lane/venv"
python3 -m venv "$lane/venv" || exit 1
"$lane/venv/bin/pip" install -q --upgrade --upgrade-strategy eager -e "$repo[test]" || exit 1

step "packages that differ from requirements/lock.txt"
"$lane/venv/bin/mlxbuild" doctor --lock "$repo/requirements/lock.txt" --json > "$lane/doctor.json"
"$lane/venv/bin/python" - "$lane/doctor.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for line in report["lock_drift"] or ["(none: the newest allowed releases are the lock's)"]:
    print("  " + line)
EOF

step "mlxbuild doctor"
"$lane/venv/bin/mlxbuild" doctor || status=1

step "the default build"
(cd "$repo" && MLXBUILD_CACHE="$lane/cache" MLXBUILD_ARTIFACTS="$lane/artifacts" \
    "$lane/venv/bin/doit" build manifests/qwen.yaml) || status=1

step "quick tests: $tests"
# shellcheck disable=SC2086
(cd "$repo" && env -u CI "$lane/venv/bin/pytest" -q -p no:cacheprovider $tests -k "$deselect") || status=1

step "lane $( [ $status = 0 ] && echo passed || echo FAILED ) (venv and logs in $lane)"
exit $status

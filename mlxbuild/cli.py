"""`mlxbuild` command line: manifest tools, and doit with the manifest loader from anywhere.

    mlxbuild build manifests/qwen.yaml [-n 2]    same as `doit build ...`
    mlxbuild doit list manifests/qwen.yaml       any doit verb over a manifest's tasks
    mlxbuild validate manifests/*.yaml           check manifests, one line per error
    mlxbuild plan manifests/qwen.yaml            steps, keys and what is already built
    mlxbuild schema                              the manifest JSON Schema
"""

from __future__ import annotations

import argparse
import json
import sys


def _doit(args: list[str]) -> int:
    from doit.doit_cmd import DoitMain

    from mlxbuild.doit_plugin import ManifestLoader

    return DoitMain(ManifestLoader(), extra_config={"GLOBAL": {}}).run(args)


def _validate(paths: list[str]) -> int:
    from mlxbuild.errors import ManifestError
    from mlxbuild.manifest import load_manifest

    status = 0
    for path in paths:
        try:
            m = load_manifest(path)
        except ManifestError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
        else:
            print(f"ok: {path}: {m.name} {m.version}, targets {', '.join(m.target_names)}")
    return status


def _plan(paths: list[str], as_json: bool) -> int:
    from mlxbuild.build import plan_manifests
    from mlxbuild.cache import Cache
    from mlxbuild.errors import MlxbuildError
    from mlxbuild.settings import roots
    from mlxbuild.tasks import is_done

    r = roots()
    try:
        plan = plan_manifests(paths, r)
    except MlxbuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = Cache(r.cache)
    rows = [{"task": s.name, "kind": s.kind, "key": s.key, "done": is_done(plan, s, cache),
             "deps": s.deps} for s in plan.steps.values()]
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(f"{'done' if row['done'] else 'todo'}  {row['key'][:12]}  {row['task']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["build"], ["doit"]):
        rest = argv[1:] if argv[0] == "doit" else argv
        return _doit(rest)
    parser = argparse.ArgumentParser(prog="mlxbuild", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build manifests (doit build ...)")
    sub.add_parser("doit", help="run a doit verb over manifests' tasks")
    v = sub.add_parser("validate", help="check manifests")
    v.add_argument("manifests", nargs="+")
    p = sub.add_parser("plan", help="show the planned steps without running anything")
    p.add_argument("manifests", nargs="+")
    p.add_argument("--json", action="store_true")
    sub.add_parser("schema", help="print the manifest JSON Schema")
    args = parser.parse_args(argv)
    if args.cmd == "validate":
        return _validate(args.manifests)
    if args.cmd == "plan":
        return _plan(args.manifests, args.json)
    if args.cmd == "schema":
        from mlxbuild.manifest import schema_text

        print(schema_text())
        return 0
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

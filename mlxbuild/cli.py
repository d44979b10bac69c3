"""`mlxbuild` command line: manifest tools, and doit with the manifest loader from anywhere.

    mlxbuild build manifests/qwen.yaml [-n 2]    same as `doit build ...`
    mlxbuild doit list manifests/qwen.yaml       any doit verb over a manifest's tasks
    mlxbuild validate manifests/*.yaml           check manifests, one line per error
    mlxbuild plan manifests/qwen.yaml            steps, keys and what is already built
    mlxbuild schema                              the manifest JSON Schema
    mlxbuild doctor [--json] [--lock FILE]       installed toolchain against the tested set
    mlxbuild check [ARTIFACTS_DIR ...]           published files against their records and locks
    mlxbuild release manifests/qwen.yaml         build, lock and bundle the version (doit release ...)
    mlxbuild check-bundle X-0.1.0.tar.gz         check a release bundle end to end
    mlxbuild inspect X.pte [--json]              what a .pte holds (methods, delegates, ops, segments)
    mlxbuild run artifacts/.../x-mlx-4w.pte      run an artifact here: greedy decode (or transcribe)
    mlxbuild run X.pte --prompt 'hi' [--tokenizer tokenizer.json]   the same from text
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def _schema(write: str | None, markdown: bool) -> int:
    from mlxbuild.manifest import SCHEMA_PATH, schema_text

    if markdown:
        from backends import capabilities

        print(capabilities.render_markdown(), end="")
    elif write is not None:
        out = Path(write) if write else SCHEMA_PATH
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {out}")
    else:
        print(schema_text())
    return 0


def manifest_main(argv: list[str] | None = None) -> int:
    """``python -m mlxbuild.manifest --write-schema [PATH] | --markdown | FILE.yaml...``: the
    older spelling of ``mlxbuild schema --write`` and ``mlxbuild validate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write-schema"]:
        return _schema(argv[1] if len(argv) > 1 else "", False)
    if argv[:1] == ["--markdown"]:
        return _schema(None, True)
    if not argv:
        print(manifest_main.__doc__, file=sys.stderr)
        return 2
    return _validate(argv)


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
             "deps": s.deps, "memory_estimate": s.memory} for s in plan.steps.values()]
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            est = f"{row['memory_estimate'] / 2**20:7.0f} MB" if row["memory_estimate"] else " " * 10
            print(f"{'done' if row['done'] else 'todo'}  {row['key'][:12]}  {est}  {row['task']}")
    return 0


def _tokenizer(args):
    """The tokenizer named by --tokenizer, else the one published beside the artifact (its
    record lists the files, relative to it); a tokenizer.json file or a folder holding one."""
    from pathlib import Path

    path = args.tokenizer
    if path is None:
        record = Path(args.pte).with_suffix(".json")
        if record.exists():
            listed = json.loads(record.read_text()).get("tokenizer")
            if isinstance(listed, dict) and "tokenizer.json" in listed.get("files", []):
                path = record.parent / "tokenizer.json"
            elif isinstance(listed, str):  # records before tokenizers travelled: the build host's path
                path = listed
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {path} not found (expected a tokenizer.json file or a folder with one)")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _run(args) -> int:
    """Run an artifact here with the loop of its task kind (greedy text generation, or
    greedy transcription for speech-to-text): MLX programs through our MLX runtime,
    XNNPACK / portable ones through ExecuTorch's."""
    from mlxbuild.progress import quiet_libraries

    quiet_libraries()
    import mlx_runtime
    from backends import open_program
    from mlxbuild import families

    try:
        program = open_program(args.pte, data_files=args.data)
        if args.info:
            from mlxbuild.pte_inspect import inspect_pte

            info = inspect_pte(args.pte)
            nodes = {}
            for name in program.method_names:
                for i, runner in enumerate(getattr(program.method(name), "delegates", [])):
                    nodes[f"{name}/{i}"] = runner.node_counts()
            out = {"methods": program.method_names, "constant_methods": program.constant_methods,
                   "operators": {m: info["methods"][m]["operators"] for m in program.method_names},
                   "delegates": {m: [d["backend_id"] for d in info["methods"][m]["delegates"]]
                                 for m in program.method_names},
                   "mlx_nodes": nodes}
            print(json.dumps(out, indent=1))
            return 0
        kind = families.of_program(program.method_names)
        if args.stream and not hasattr(kind, "describe_partial"):
            raise ValueError(f"--stream: {args.pte} is a {kind.NAME} program ({', '.join(program.method_names)}), "
                             "which takes its input whole; a streaming-speech-to-text program streams")
        if args.chunk_ms <= 0:
            raise ValueError(f"--chunk-ms {args.chunk_ms}: must be a positive number of milliseconds")
        tokenizer = _tokenizer(args)
        if args.stream and not args.json:
            args.on_partial = lambda chunk: print(kind.describe_partial(chunk, tokenizer), flush=True)
        kind.prepare_inputs(program, args, tokenizer)
        result = kind.run(program, args)
    except (mlx_runtime.ProgramError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is not None:
        result["text"] = tokenizer.decode(result["tokens"])
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(kind.describe(result)))
    return 0


GC_DAYS = 30.0


def _gc(args) -> int:
    from mlxbuild import gc
    from mlxbuild.errors import MlxbuildError
    from mlxbuild.memory import parse_size
    from mlxbuild.settings import REMOTE_ENV, remote_cache, roots

    try:
        max_size = None
        if args.max_size:
            if args.max_size.strip().endswith("%"):
                raise ValueError("a size such as 50G, not a share of memory")
            max_size = parse_size(args.max_size)
        url = None
        if args.remote is not None or args.remote_only:
            if args.remote:
                from mlxbuild.remote import parse_url

                try:
                    url = str(parse_url(args.remote))
                except ValueError as e:
                    raise MlxbuildError(f"--remote {args.remote}: {e}") from None
            else:
                url = remote_cache([])
                if url is None:
                    raise MlxbuildError(f"--remote: no remote cache is set (give its URL, or set {REMOTE_ENV} "
                                        "or [tool.mlxbuild] remote_cache)")
        r = roots()
        # By default the artifacts folder's locks and records (none yet: nothing to keep).
        keep = [Path(p) for p in args.keep] or ([r.artifacts] if r.artifacts.exists() else [])
        return gc.run(Path(args.cache).absolute() if args.cache else r.cache, keep, args.older_than, max_size,
                      args.dry_run, url, local=not args.remote_only)
    except ValueError as e:
        print(f"error: --max-size {args.max_size}: {e}", file=sys.stderr)
        return 2
    except MlxbuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None, parse_only: bool = False):
    """Run the command line `argv`. With `parse_only`, run nothing: return the parsed
    argparse namespace, or for the commands doit runs, the argument list given to doit
    (tests check documented command lines with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["build"], ["doit"], ["release"]):
        rest = argv[1:] if argv[0] == "doit" else argv
        return rest if parse_only else _doit(rest)
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
    sc = sub.add_parser("schema", help="print the manifest JSON Schema (--write: into schema/)")
    sc.add_argument("--write", nargs="?", const="", metavar="PATH",
                    help="write it (default: the committed schema/manifest.schema.json)")
    sc.add_argument("--markdown", action="store_true", help="print the backend capability table instead")
    ck = sub.add_parser("check", help="every published artifact against its record and release lock "
                        "(exit 4 on a mismatch)")
    ck.add_argument("dirs", nargs="*", metavar="ARTIFACTS_DIR", help="default: $MLXBUILD_ARTIFACTS or ./artifacts")
    d = sub.add_parser("doctor", help="the installed toolchain against the tested set (exit 2 on a "
                       "version known to break, or with --lock on any drift from the lock)")
    d.add_argument("--json", action="store_true")
    d.add_argument("--lock", metavar="FILE", help="also compare every installed package with this "
                   "pip-compile lock (e.g. requirements/lock.txt)")
    sub.add_parser("release", help="build, lock and bundle manifests' versions (doit release ...)")
    cb = sub.add_parser("check-bundle", help="check a release bundle end to end (checksums, lock, artifacts run)")
    cb.add_argument("bundles", nargs="+")
    cb.add_argument("--no-run", action="store_true", help="deserialize the artifacts but do not run them")
    rp = sub.add_parser("report", help="one self-contained HTML page of a build (its --report JSON) or a "
                        "release (its release.lock.json or version folder): size, quality, speed, timeline")
    rp.add_argument("source", metavar="REPORT.json|release.lock.json|VERSION_DIR")
    rp.add_argument("-o", "--output", metavar="PATH.html", help="default: beside a build report (report.html); "
                    "for a release, NAME-VERSION-report.html here")
    cache = sub.add_parser("cache", help="the build cache (gc: trim the local and the remote tier)")
    gc = cache.add_subparsers(dest="cache_cmd", required=True).add_parser(
        "gc", help="remove cache entries no lock, record or report references, by age and size")
    gc.add_argument("--keep", action="append", default=[], metavar="PATH",
                    help="a release lock, a published record, a build report (--report JSON) or a folder "
                         "of them: every entry they name stays (repeatable; default: $MLXBUILD_ARTIFACTS "
                         "or ./artifacts)")
    gc.add_argument("--older-than", type=float, default=GC_DAYS, metavar="DAYS",
                    help=f"remove other entries unused for this long (default {GC_DAYS:g}; remote: since upload)")
    gc.add_argument("--max-size", metavar="SIZE", help="then remove the least recently used until the tier "
                    "fits (e.g. 50G)")
    gc.add_argument("--remote", nargs="?", const="", metavar="s3://BUCKET/PREFIX",
                    help="also the remote tier (default URL: $MLXBUILD_REMOTE_CACHE or pyproject's "
                         "[tool.mlxbuild] remote_cache)")
    gc.add_argument("--remote-only", action="store_true", help="only the remote tier")
    gc.add_argument("--cache", metavar="DIR", help="the local cache (default: $MLXBUILD_CACHE or ./.mlxbuild)")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    ins = sub.add_parser("inspect", help="methods, constant methods, delegates, ops and segments of a .pte")
    ins.add_argument("pte")
    ins.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run a .pte on this host (greedy decoding or transcription); MLX "
                       "programs through mlx.core, XNNPACK/portable through executorch.runtime")
    r.add_argument("pte")
    r.add_argument("--ids", help="prompt token ids, e.g. '1 15 27' (default: --random)")
    r.add_argument("--prompt", help="prompt text, encoded with the tokenizer")
    r.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or a folder with one); default: "
                   "the manifest's, from the artifact's record")
    r.add_argument("--random", type=int, default=8, metavar="N", help="a random prompt of N ids (default 8)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--no-eos", action="store_true", help="do not stop at get_eos_ids")
    r.add_argument("--method", default="forward", help="text generation: the method to run")
    r.add_argument("--audio", metavar="WAV", help="speech-to-text: a .wav file, turned into log-mel "
                   "features with transformers' WhisperFeatureExtractor (default: a synthetic input)")
    r.add_argument("--features", metavar="NPY", help="speech-to-text: log-mel features [n_mels, frames] "
                   "or [1, n_mels, frames] in a .npy file")
    r.add_argument("--image", metavar="PNG", help="multimodal: an image for the program's vision_encoder")
    r.add_argument("--prefix-ids", metavar="IDS", help="multimodal: token ids before the media, e.g. a chat "
                   "template's '1 3 25' (default: the program's get_prompt_prefix_ids, its BOS)")
    r.add_argument("--stream", action="store_true", help="streaming speech-to-text: feed --audio as it "
                   "would arrive, --chunk-ms at a time, printing the transcript so far after each piece")
    r.add_argument("--chunk-ms", type=int, default=80, metavar="N", help="--stream: milliseconds of audio "
                   "per piece (default 80: one audio token)")
    r.add_argument("--data", action="append", default=[], metavar="PTD",
                   help="a .ptd data file (default: the ones beside the .pte)")
    r.add_argument("--info", action="store_true", help="print methods, constant methods and MLX node counts")
    r.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if parse_only:
        return args
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "validate":
        return _validate(args.manifests)
    if args.cmd == "plan":
        return _plan(args.manifests, args.json)
    if args.cmd == "check-bundle":
        from mlxbuild.bundle import main as check_bundle_main

        return check_bundle_main(args.bundles, run=not args.no_run)
    if args.cmd == "report":
        from mlxbuild.html_report import main as report_main

        return report_main(args.source, args.output)
    if args.cmd == "cache":
        return _gc(args)
    if args.cmd == "inspect":
        from mlxbuild.pte_inspect import main as inspect_main

        return inspect_main(args.pte, as_json=args.json)
    if args.cmd == "check":
        from mlxbuild.check import main as check_main

        return check_main(args.dirs)
    if args.cmd == "doctor":
        from mlxbuild.toolchain import main as doctor_main

        return doctor_main(as_json=args.json, lock=args.lock)
    if args.cmd == "schema":
        return _schema(args.write, args.markdown)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""The `zoetrope` command line.

  zoetrope run [--profile NAME] [--set section.key=value ...] [--data FOLDER]
                                                               the pipeline flow, in-process
  zoetrope generate "PROMPT" --out FILE.mp4 [--seed N] [--height H --width W]   via ONNX
  zoetrope expand "PROMPT" [--json]                            the long caption generation uses
  zoetrope serve [--port N]                                    the Bento service on localhost
  zoetrope import-model [--version N]                          registry -> BentoML model store
  zoetrope stage NAME                                          one DVC stage (dvc.yaml's cmd)
  zoetrope resolve [--profile NAME] [--set ...]                write the params DVC reads
  zoetrope deploy [--profile NAME]                             serve dashboard deployments
  zoetrope up [--prefect-port N] [--mlflow-port N]             Prefect + MLflow + deployments
  zoetrope reproduce RUN_ID [--force]                          rerun a run with its params, data
  zoetrope rollback [--to VERSION]                             move `champion` back

Heavy libraries are imported inside commands so `--help` and argument errors are instant, and
so the environment (telemetry off, per-project Prefect home) is set before Prefect loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _fail(message: str, code: int = 2) -> int:
    print(f"zoetrope: error: {message}", file=sys.stderr)
    return code


def _project():
    from flows.project import Project, quiet_environment

    project = Project.find()
    quiet_environment(project)
    return project


# ---------------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    from components.config import ConfigError

    project = _project()
    try:  # validate before starting Prefect, so a typo fails in a second with its name
        project.resolve_params(args.profile, args.set)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.data is not None and not os.path.isdir(args.data):
        return _fail(f"--data {args.data!r} is not a folder: pass the folder of your videos")
    from flows.pipeline import pipeline

    t0 = __import__("time").time()
    try:
        summary = pipeline(profile=args.profile, overrides=args.set, project_dir=str(project.root),
                           data=args.data)
    except Exception as exc:  # noqa: BLE001 - the flow already logged the traceback
        return _fail(f"pipeline failed: {exc}", 1)
    _print_summary(summary, __import__("time").time() - t0)
    return 0


def _print_summary(s: dict, seconds: float) -> None:
    print("\n=== Zoetrope pipeline summary ===")
    ran = [r["stage"] for r in s["stages"] if r["ran"]]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}; wall time {seconds:.0f} s")
    print("gates:")
    for g in s["gates"]:
        mark = "PASS" if g["passed"] else "FAIL"
        print(f"  [{mark}] {g['name']:<24} {g['value']:.4g} {g['op']} {g['threshold']:.4g}")
    print(f"MLflow run id: {s['mlflow_run_id']}  (tracking: {s['tracking_uri']})")
    version = s.get("registered_version")
    if version is None:
        pass
    elif s["champion"]:
        print(f"registered model: zoetrope-t2v version {version} -> alias 'champion'")
    else:
        alias = s.get("alias")
        print(f"registered model: zoetrope-t2v version {version} -> "
              f"{repr(alias) + ' ' if alias else 'no alias '}(NOT promoted)")
        for reason in s.get("failed_gates", []):
            print(f"  failed gate {reason}")
    if version is not None and s.get("promotion"):
        print(f"champion/challenger: {s['promotion']['reason']}")
    print(f"sample videos: {s['samples']}")


def cmd_resolve(args) -> int:
    from components.config import ConfigError

    project = _project()
    try:
        cfg = project.resolve_params(args.profile, args.set)
    except ConfigError as exc:
        return _fail(str(exc))
    print(json.dumps(cfg.flat(), indent=1))
    return 0


def cmd_stage(args) -> int:
    from flows.stages import STAGES, main

    if args.name not in STAGES:
        return _fail(f"unknown stage {args.name!r}: stages are {', '.join(STAGES)}")
    _project()
    return main(args.name)


def _bundle(args):
    from flows import tracking

    project = _project()
    try:
        return tracking.download_bundle(project, args.version)
    except LookupError as exc:
        raise SystemExit(_fail(str(exc)))


def _expand_settings():
    """The project's expansion settings and training-caption distribution (defaults outside one)."""
    from components import config as C
    from flows.project import Project, ProjectError, quiet_environment

    try:
        project = Project.find()
    except ProjectError:
        quiet_environment()
        return C.ExpandConfig(), None
    quiet_environment(project)
    cfg = C.load(project.root / "params.yaml").expand
    captions = project.path("data/captions/captions.csv")
    if not captions.exists():
        return cfg, None  # the world's balanced distribution
    import csv

    from components.expand import distribution_from_captions

    with open(captions, newline="") as fh:
        return cfg, distribution_from_captions([r["caption"] for r in csv.DictReader(fh)])


def cmd_expand(args) -> int:
    from components.expand import expand

    cfg, distribution = _expand_settings()
    try:
        result = expand(args.prompt, seed=args.seed, cfg=cfg, distribution=distribution)
    except ValueError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(result["caption"])
        if result["ungrounded"]:
            print(f"(not grounded: {', '.join(result['ungrounded'])})", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if not args.out.lower().endswith((".mp4", ".gif")):
        return _fail(f"--out {args.out!r}: use a file name ending in .mp4 or .gif")
    prompt = args.prompt
    if not args.no_expand:  # the model was trained on long captions: expand the short prompt
        from components.expand import expand

        cfg, distribution = _expand_settings()
        try:
            expanded = expand(prompt, seed=args.seed, cfg=cfg, distribution=distribution)
        except ValueError as exc:
            return _fail(str(exc))
        prompt = expanded["caption"]
        print(f"expanded prompt: {prompt!r}" + (f" (not grounded: {', '.join(expanded['ungrounded'])})"
                                                 if expanded["ungrounded"] else ""))
    bundle_dir, version = _bundle(args)
    from components.onnx_runtime import OnnxT2V
    from components.video_io import write_video

    runtime = OnnxT2V(bundle_dir)
    try:
        frames = runtime.generate(prompt, seed=args.seed, steps=args.steps,
                                  guidance=args.guidance, num_frames=args.num_frames,
                                  height=args.height, width=args.width)
    except ValueError as exc:
        return _fail(str(exc))
    write_video(args.out, frames, runtime.fps)
    t, h, w, _ = frames.shape
    print(f"wrote {args.out}: {t} frames {w}x{h} from zoetrope-t2v version {version} "
          f"({runtime.provider})")
    return 0


def cmd_import_model(args) -> int:
    bundle_dir, version = _bundle(args)
    from flows import tracking
    from flows.project import REGISTERED_MODEL
    from serving.store import import_bundle

    champion = tracking.champion_version(_project())
    labels = {"mlflow_version": version, "alias": "champion" if str(champion) == str(version) else "none"}
    tag = import_bundle(bundle_dir, labels=labels,
                        metadata={"mlflow_model": f"models:/{REGISTERED_MODEL}/{version}"})
    print(f"imported zoetrope-t2v version {version} into the BentoML model store as {tag} "
          "(serve it: bentoml serve serving.service:TextToVideo; pack it: bentoml build)")
    return 0


def cmd_serve(args) -> int:
    bundle_dir, version = _bundle(args)
    env = dict(os.environ, ZOETROPE_BUNDLE=str(bundle_dir))
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:TextToVideo",
           "--host", args.host, "--port", str(args.port)]
    print(f"serving zoetrope-t2v version {version} on http://{args.host}:{args.port} "
          f"(POST /generate, docs at /docs)", flush=True)
    import subprocess

    from flows.project import Project

    return subprocess.call(cmd, env=env, cwd=str(Project.find().root))


def cmd_deploy(args) -> int:
    project = _project()
    if not os.environ.get("PREFECT_API_URL"):
        return _fail("PREFECT_API_URL is not set: start a server (`prefect server start`, or use "
                     "`zoetrope up`), then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from flows.deploy import deployment_names, serve_deployments

    print(f"serving {len(deployment_names())} deployments from {project.root} on "
          f"{os.environ['PREFECT_API_URL']}: {', '.join(deployment_names())}", flush=True)
    serve_deployments(project, args.profile, limit=args.limit)
    return 0


def cmd_up(args) -> int:
    project = _project()
    from flows.up import UpError, up

    try:
        up(project, args.prefect_port, args.mlflow_port, args.profile, timeout=args.timeout)
    except UpError as exc:
        return _fail(str(exc), 1)
    return 0


def cmd_reproduce(args) -> int:
    project = _project()
    from flows.reproduce import ReproduceError, reproduce

    try:
        result = reproduce(project, args.run_id, force=args.force)
    except ReproduceError as exc:
        return _fail(str(exc), 1)
    if not result["same_commit"]:
        print(f"note: run {args.run_id} was recorded at commit {result['git_commit']}; the code is "
              f"now at {project.git_commit()} (check it out for an exact reproduction)")
    if result["pinned"]:
        print(f"params.yaml changed since the run; pinned: {' '.join(result['pinned'])}")
    print(f"reproduced {args.run_id} as MLflow run {result['new_run_id']} "
          f"(profile {result['profile']}, overrides: {' '.join(result['overrides']) or 'none'})")
    if result["identical"]:
        print(f"metrics identical: {len(result['compared'])} compared")
        return 0
    for k, (old, new) in result["differences"].items():
        print(f"  {k}: recorded {old} reproduced {new}")
    return _fail(f"{len(result['differences'])} of {len(result['compared'])} metrics differ", 1)


def cmd_rollback(args) -> int:
    project = _project()
    from mlflow import MlflowClient

    from flows import tracking
    from flows.registry import RollbackError, rollback

    tracking.setup(project)
    try:
        old, new = rollback(MlflowClient(project.tracking_uri), args.to)
    except RollbackError as exc:
        return _fail(str(exc), 1)
    print(f"zoetrope-t2v: alias 'champion' moved from version {old} to version {new}")
    if not args.no_bento:  # keep the BentoML store's model (what `bentoml build` packs) in step
        from serving.store import import_bundle

        bundle, _ = tracking.download_bundle(project, new)
        tag = import_bundle(bundle, labels={"alias": "champion", "mlflow_version": new},
                            metadata={"mlflow_model": f"models:/zoetrope-t2v/{new}"})
        print(f"BentoML model store: {tag}")
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zoetrope", description="Text-to-video MLOps: Prefect, DVC, MLflow, ONNX, BentoML.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def profile_args(sp):
        sp.add_argument("--profile", default="tiny", help="profile from params.yaml (default: tiny)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one params.yaml value (repeatable)")

    sp = sub.add_parser("run", help="run the whole pipeline (stages up to date are skipped)")
    profile_args(sp)
    sp.add_argument("--data", default=None, metavar="FOLDER",
                    help="train on your own videos in FOLDER (recursive: mp4 mov mkv webm avi gif; "
                         "captions in NAME.txt or a CSV/JSONL of path,caption) instead of the synthetic world")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("resolve", help="write .zoetrope/params.yaml for a profile and overrides")
    profile_args(sp)
    sp.set_defaults(fn=cmd_resolve)

    sp = sub.add_parser("stage", help="run one DVC stage (used by dvc.yaml)")
    sp.add_argument("name")
    sp.set_defaults(fn=cmd_stage)

    def positive(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be at least 1")
        return value

    def seed(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 0 <= value < 2**31:
            raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**31)")
        return value

    sp = sub.add_parser("deploy", help="register dashboard deployments on $PREFECT_API_URL and serve them")
    sp.add_argument("--profile", default="tiny", help="the profile the Run form starts with")
    sp.add_argument("--limit", type=positive, default=None, help="at most N flow runs at once")
    sp.set_defaults(fn=cmd_deploy)

    sp = sub.add_parser("up", help="start the Prefect server, the MLflow server and the deployments")
    sp.add_argument("--prefect-port", type=positive, default=4200)
    sp.add_argument("--mlflow-port", type=positive, default=5000)
    sp.add_argument("--profile", default="tiny", help="the profile the Run form starts with")
    sp.add_argument("--timeout", type=positive, default=180, help="seconds to wait for each service")
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("reproduce", help="rerun a pipeline run with its recorded params and data")
    sp.add_argument("run_id", help="the MLflow run id of a pipeline run")
    sp.add_argument("--force", action="store_true",
                    help="rerun every stage from scratch instead of restoring outputs from DVC's cache")
    sp.set_defaults(fn=cmd_reproduce)

    sp = sub.add_parser("rollback", help="move the 'champion' alias back to the previous champion")
    sp.add_argument("--to", default=None, metavar="VERSION", help="a registered version instead")
    sp.add_argument("--no-bento", action="store_true", help="leave the BentoML model store as it is")
    sp.set_defaults(fn=cmd_rollback)

    sp = sub.add_parser("generate", help="generate a video from the champion model (ONNX Runtime)")
    sp.add_argument("prompt")
    sp.add_argument("--out", required=True, help="output file (.mp4 or .gif)")
    sp.add_argument("--seed", type=seed, default=0)
    sp.add_argument("--steps", type=positive, default=None, help="sampling steps (default: bundle's)")
    sp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    sp.add_argument("--num-frames", type=positive, default=None)
    sp.add_argument("--height", type=positive, default=None,
                    help="frame height in pixels, a multiple of 8 (default: the trained square size)")
    sp.add_argument("--width", type=positive, default=None, help="frame width (e.g. --height 24 --width 40: landscape)")
    sp.add_argument("--version", default=None, help="registered model version (default: champion)")
    sp.add_argument("--no-expand", action="store_true",
                    help="use the prompt as written (default: expand it to a long caption first)")
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("expand", help="expand a short prompt into the long caption generation uses")
    sp.add_argument("prompt")
    sp.add_argument("--seed", type=seed, default=0, help="seed for the attributes the prompt leaves open")
    sp.add_argument("--json", action="store_true", help="print the attributes, grounding and ungrounded words")
    sp.set_defaults(fn=cmd_expand)

    sp = sub.add_parser("import-model", help="copy a registered version (default: champion) into the "
                        "BentoML model store, where the service and `bentoml build` find it")
    sp.add_argument("--version", default=None, help="registered model version (default: champion)")
    sp.set_defaults(fn=cmd_import_model)

    sp = sub.add_parser("serve", help="serve the champion with BentoML on localhost")
    sp.add_argument("--port", type=positive, default=3000)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--version", default=None, help="registered model version (default: champion)")
    sp.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; details with ZOETROPE_DEBUG=1
        if os.environ.get("ZOETROPE_DEBUG"):
            raise
        from flows.project import ProjectError

        if isinstance(exc, ProjectError):
            return _fail(str(exc))
        return _fail(f"{type(exc).__name__}: {exc} (set ZOETROPE_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())

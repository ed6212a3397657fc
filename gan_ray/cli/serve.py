"""`gan-ray serve`: deploy an exported model on Ray Serve and run until stopped (or, with --build, print the
`serve deploy` config for the same settings). Every ServeArgs field is a flag of the same name."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from gan_ray.cli.flags import add_address, add_ingress, add_settings_flags, given_values, port, stopped
from gan_ray.serve.schema import ServeArgs

FLAG_ALIASES = {"batch_wait_timeout_s": "--batch-wait-s"}  # the flag's first, shorter spelling still works


def add_command(sub) -> None:
    p = sub.add_parser("serve", help="serve an exported model over HTTP with Ray Serve (autoscaled, batched)",
                       description="Deploy the generator behind POST /v1/generate, GET /v1/model, GET /healthz "
                                   "(OpenAPI at /docs) and run until Ctrl-C. With --build, print the `serve "
                                   "deploy` config for the same settings instead.")
    p.add_argument("--model", required=True, help="exported model directory (gan-ray export)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port")
    add_settings_flags(p, ServeArgs, exclude=("model",), aliases=FLAG_ALIASES)
    add_address(p)
    add_ingress(p)
    p.add_argument("--wait-for-model", action="store_true",
                   help="deploy even if --model does not (yet) hold a model: the app stays DEPLOYING (not ready; "
                        "requests wait, the replica log says why) until one appears there (e.g. a sweep's --export), "
                        "then it serves. Without it a missing or corrupt model is refused at once")
    p.add_argument("--build", action="store_true", help="print the `serve deploy` config YAML and exit")
    p.add_argument("--out", default=None, help="with --build: write the YAML to this file instead of stdout")
    p.set_defaults(func=run)


def serve_args(args: argparse.Namespace) -> ServeArgs:
    """The deployment's settings from the flags given (ServeArgs' defaults for the rest)."""
    return ServeArgs(**given_values(args, ServeArgs))


def run(args: argparse.Namespace) -> int:
    sargs = serve_args(args)
    if args.build:
        return build(args, sargs)
    from gan_ray.serve.deployment import start_serving, stop_serving

    try:
        url = start_serving(sargs, host=args.host, port=args.port, address=args.address, ingress=args.ingress,
                            wait_for_model=args.wait_for_model)
        print(f"serving {Path(args.model).resolve()} at {url}  (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
        if args.wait_for_model:
            print("  not ready until a model is there: the app stays DEPLOYING (`serve status`), requests wait, "
                  "and the replica log says why", flush=True)
        print(f"  try: curl -s -X POST {url}/v1/generate -H 'Content-Type: application/json' "
              "-d '{\"n\": 16, \"seed\": 1}' -o grid.png", flush=True)
        while True:  # until Ctrl-C or SIGTERM (which the CLI turns into a Ctrl-C)
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_serving()
        return stopped("serve", f"deleted the deployment and shut down the Ray cluster it started; port "
                                f"{args.port} is free")
    finally:
        stop_serving()  # also after an error; a no-op once done


def build(args: argparse.Namespace, sargs: ServeArgs) -> int:
    """--build: the `serve deploy` config for these settings, for a model that loads here (or, with
    --wait-for-model, one that the replicas will wait for)."""
    import yaml

    from gan_ray.core.locations import write_bytes
    from gan_ray.core.model_dir import load_generator
    from gan_ray.serve.deployment import deploy_config

    if not args.wait_for_model:
        load_generator(args.model)  # a missing or corrupt model fails here, not on the cluster
    text = yaml.safe_dump(deploy_config(sargs, host=args.host, port=args.port), sort_keys=False)
    if args.out:
        write_bytes(Path(args.out), text.encode())
        print(f"wrote {args.out}: deploy with `serve deploy {args.out}` (the model path must exist on every "
              "node that runs a replica)")
    else:
        print(text, end="")
    return 0

"""The `sidecar` command: run a node, talk to one (mi), run the demo, make CURVE keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .daemon import run
    from .incarnation import IncarnationError

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"sidecar: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK (node {cfg.node_id}, {len(cfg.peers)} peer(s))")
        return 0
    try:
        run(cfg)
    except IncarnationError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The lab failover demo when this machine can build network namespaces (root, ip, nft,
    kamailio, sipp), else the loopback replication demo."""
    if not args.loopback:
        from .demo_lab import lab_unavailable
        from .demo_lab import main as lab_main

        why = lab_unavailable()
        if why is None:
            return lab_main(phones=args.phones)
        print(f"network-namespace lab unavailable ({why}); running the loopback pair demo")
    from .demo import main as demo_main

    return demo_main(contacts=args.contacts)


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(out, args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mi":
        from .admin.client import main_mi

        return main_mi(argv[1:])
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a node")
    p.add_argument("--config", "-c", required=True, help="TOML config file")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=_run)
    sub.add_parser("mi", help="send an admin command: sidecar mi [--url U] CMD [PARAMS...]")
    p = sub.add_parser("demo", help="run an active/standby pair on this machine")
    p.add_argument("--contacts", type=int, default=50_000, help="loopback demo load")
    p.add_argument("--phones", type=int, default=200, help="lab demo phones behind the NAT")
    p.add_argument("--loopback", action="store_true",
                   help="the loopback replication demo even where the lab could run")
    p.set_defaults(func=_demo)
    p = sub.add_parser("keygen", help="create a CURVE keypair for replication links")
    p.add_argument("directory")
    p.add_argument("name")
    p.set_defaults(func=_keygen)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""ZeroMQ CURVE settings for replication links (encryption + peer authentication).

Keys are ZeroMQ certificate files (``zmq.auth.create_certificates`` / ``sidecar keygen``):
each node has a keypair; a node's server sockets (PUB, ROUTER) accept only clients whose
public key is in ``authorized_keys_dir``, and its client sockets (SUB, DEALER) check the
peer's public key, so a stranger can neither read contacts nor inject changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True, slots=True)
class CurveConfig:
    public_key: bytes
    secret_key: bytes
    authorized_keys_dir: Path | None = None

    @classmethod
    def from_files(cls, secret_file: Path, authorized_keys_dir: Path | None) -> CurveConfig:
        public, secret = zmq.auth.load_certificate(secret_file)
        if not secret:
            raise ValueError(f"{secret_file} holds no secret key")
        return cls(public, secret, authorized_keys_dir)


def load_public_key(path: Path) -> bytes:
    public, _ = zmq.auth.load_certificate(path)
    return public


def apply_server_curve(sock: zmq.Socket, curve: CurveConfig) -> None:
    sock.curve_secretkey = curve.secret_key
    sock.curve_publickey = curve.public_key
    sock.curve_server = True


def apply_client_curve(sock: zmq.Socket, curve: CurveConfig, server_public_key: bytes) -> None:
    sock.curve_secretkey = curve.secret_key
    sock.curve_publickey = curve.public_key
    sock.curve_serverkey = server_public_key

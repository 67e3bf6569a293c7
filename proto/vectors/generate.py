"""Regenerate the golden vectors: `python proto/vectors/generate.py`.

Each vector is NAME.bin (the msgpack payload frame, exactly as on the wire) plus NAME.json
({"kind": the kind frame, "decoded": the payload as JSON}). Tests decode every .bin and compare
with .json, and re-encode the decoded value and compare with the .bin, so a codec change that
alters bytes on the wire cannot go unnoticed. Only regenerate for a deliberate protocol change.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack

from sidecar.replication import antientropy, wire

HERE = Path(__file__).parent
H1 = (1 << 56) | (1795000000 << 24) | 1
H2 = (1 << 56) | (1795000000 << 24) | 2
CONTACT_NAT = ("alice@sip.example.com", "sip:alice@10.0.0.7:5060;transport=udp",
               "sip:198.51.100.7:40001", None, "udp:203.0.113.10:5060", 1795003600, 500,
               "a84b4c76e66710@pc33", 314, "Yealink SIP-T46S 66.86.0.15", 1, 7, 8191, None, 0,
               None, 1795000000123, H1)
CONTACT_OUTBOUND = ("bob@sip.example.com", "sip:bob@192.0.2.4:5070", None, "<sip:edge1;lr>",
                    "udp:203.0.113.10:5060", 0, -1, "x1@bob", 1, None, 0, 0, None,
                    "<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", 1, "tenant=acme",
                    1795000000200, H2)

VECTORS = {
    "batch_put_refresh_delete": (wire.BATCH, wire.encode_batch(
        1, 1795000000, 3, 101, 1795000000000,
        [CONTACT_NAT, CONTACT_OUTBOUND, (H1, 1795007200, 315, 250),
         ("carol@sip.example.com", "sip:carol@192.0.2.9", "c9@carol", 7, 1795000000400,
          1 << 56)])),
    "batch_refresh_only": (wire.BATCH, wire.encode_batch(
        1, 1795000000, 3, 105, 1795000001000, [(H1, 1795007260, 316, 12)])),
    "heartbeat": (wire.HEARTBEAT, wire.encode_heartbeat(1, 1795000000, 3, 105, 1795000001500,
                                                        "active")),
    "sync_request_replay": (wire.SYNC, wire.encode_sync_request(2, 1795000000, 102, 7)),
    "sync_request_full": (wire.SYNC, wire.encode_sync_request(2, 0, 0, 1)),
    "snapshot_chunk": (wire.SNAP, wire.encode_snapshot_chunk(1795000000, 105, 1, 0,
                                                             1795000002000, [CONTACT_NAT])),
    "sync_end_snapshot": (wire.END, wire.encode_sync_end(1795000000, 105, 1, wire.MODE_SNAPSHOT,
                                                         1, 1795000002000)),
    "error_version": (wire.ERROR, wire.encode_error(wire.ERR_VERSION,
                                                   "sync request: protocol version 2, want 1")),
}

# Anti-entropy (PROTOCOL §15): 8 buckets keep the vectors small; the digest pins the bucket
# function (CRC-32 of the binding key) and the record hash (blake2b-8 of the msgpack record).
AE_BUCKETS = 8
AE_DIGEST = antientropy.compute_digest([CONTACT_NAT, CONTACT_OUTBOUND], 1, AE_BUCKETS,
                                       horizon_s=1795000008)
AE_NAT_BUCKET = antientropy.record_bucket(CONTACT_NAT, AE_BUCKETS)
VECTORS.update({
    "digest_request": (wire.DIGEST_REQUEST, wire.encode_digest_request(2, 1795000000, 9,
                                                                       AE_BUCKETS)),
    "cut": (wire.CUT, wire.encode_cut(1795000000, 105, 9, 1795000003000, 1795000008)),
    "digest": (wire.DIGEST, wire.encode_digest(1795000000, 105, 9, AE_DIGEST.counts,
                                               AE_DIGEST.sums)),
    "bucket_request": (wire.BUCKET_REQUEST, wire.encode_bucket_request(
        2, 1795000000, 10, AE_BUCKETS, [AE_NAT_BUCKET])),
    "buckets": (wire.BUCKETS, wire.encode_buckets(1795000000, 105, 10, AE_BUCKETS,
                                                  [AE_NAT_BUCKET], [CONTACT_NAT])),
})


def to_json(obj):
    if isinstance(obj, tuple | list):
        return [to_json(x) for x in obj]
    return obj


def main() -> None:
    for name, (kind, payload) in VECTORS.items():
        (HERE / f"{name}.bin").write_bytes(payload)
        decoded = msgpack.unpackb(payload, use_list=False, raw=False)
        (HERE / f"{name}.json").write_text(json.dumps(
            {"kind": kind.decode(), "decoded": to_json(decoded)}, indent=1) + "\n")
        print(f"{name}: {len(payload)} bytes")


if __name__ == "__main__":
    main()

"""A stand-in for OpenSIPS 3.6 in tests: MI over HTTP and FIFO, plus an event sender.

It exists ONLY because no OpenSIPS can run on this machine (there is no Debian package and no
network to build one). It does not invent formats: every MI answer is a payload recorded from
a real OpenSIPS 3.6.8 in shared/opensips-samples/ (``mi/``), served verbatim or with the
recorded structure filled from the fake's current table (``ul_dump`` / ``ul_show_contact``
serve the recorded contact dicts; ``subscribers_list`` and ``get_statistics`` use the recorded
layout and key names). Error answers are the recorded ones too (404 "AOR not found",
-32602 "Bad type for parameter 'brief'"). The behaviours reproduced are the ones the samples
README describes: mi_http hangs on a form-encoded body and closes on ``text/plain``; ``brief``
must be an integer; subscriptions vanish on restart and expire after ``expire`` seconds.

Events are sent the way OpenSIPS sends them: event_datagram = one compact JSON object per UDP
datagram from several source ports (one socket per OpenSIPS process); event_stream = one
TCP connection carrying concatenated JSON objects with no delimiter.

Failure injection for the sidecar's error paths: ``failure = "http500" | "hang" | "badjson"``
(HTTP 500 with no body, as OpenSIPS does when a reply does not fit its buffer; no answer at
all; a recorded reply cut in half).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "opensips-samples"
CAPTURE_MID = 1_795_389_620  # when ul_dump_A / ul_show_contact_*_A were taken (UNIX s)
CAPTURE_END = 1_795_389_659  # when ul_dump_end_A / ul_dump_end_B were taken
NODE_SOCKETS = {"A": "udp:127.0.0.1:5060", "B": "udp:127.0.0.2:5060"}


def load_sample(*parts: str) -> Any:
    return json.loads(SAMPLES.joinpath(*parts).read_text())


def encode_event(payload: dict) -> bytes:
    """OpenSIPS prints notifications compactly: ``{"jsonrpc":"2.0","method":...}``."""
    return json.dumps(payload, separators=(",", ":")).encode()


def scenario_lines(node: str | None = None) -> list[dict]:
    """``sequence_scenario2.jsonl`` entries (node, transport, t_rel_s, after_step, payload)."""
    lines = SAMPLES.joinpath("events", "sequence_scenario2.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return [e for e in out if node is None or e["node"] == node]


def recorded_dump_aors(name: str) -> dict[str, list[dict]]:
    """AOR -> recorded contact dicts of a recorded full ``ul_dump`` response."""
    result = load_sample("mi", name)["response"]["result"]
    return {a["AOR"]: copy.deepcopy(a.get("Contacts", []))
            for d in result["Domains"] for a in d["AORs"]}


class FakeOpensips:
    """MI (mi_http at ``/mi``) of one recorded node, with a mutable location table."""

    def __init__(self, node: str = "A", host: str = "127.0.0.1") -> None:
        self.node = node
        self.host = host
        self.table = "location"
        self.aors: dict[str, list[dict]] = {}
        # (event, socket) -> (expire, monotonic time subscribed)
        self.subscriptions: dict[tuple[str, str], tuple[int, float]] = {}
        self.calls: list[tuple[str, Any, str]] = []  # (method, params, content type)
        self.failure: str | None = None
        self.fail_methods: set[str] | None = None  # None: every method fails
        self._event_ids = {e["name"]: e["id"] for e in
                           load_sample("mi", "events_list_A.json")["response"]["result"]["Events"]}
        self._version = load_sample("mi", "version_A.json")["response"]["result"]
        stats = load_sample("mi", f"get_statistics_usrloc_{node}.json")["response"]["result"]
        self._stat_keys = list(stats)
        self._not_found = load_sample("mi", "ul_show_contact_nobody_A.json")["response"]["error"]
        self._bad_brief = load_sample(
            "mi", "ul_dump_brief_as_string_ERROR_A.json")["response"]["error"]
        self._cut_reply = json.dumps(load_sample("mi", "ul_show_contact_bob_A.json")["response"])
        self._ul_add_error = load_sample("mi", "ul_add_missing_param_A.json")["response"]["error"]
        # what an MI-added contact looks like in ul_show_contact (recorded for frank)
        frank = load_sample("mi", "ul_show_contact_frank_A.json")["response"]["result"]
        self._mi_contact = {k: v for k, v in frank["Contacts"][0].items() if k != "ContactID"}
        self.natping = load_sample("mi", "nh_enable_ping_A.json")["response"]["result"]["Status"]
        self._runner: web.AppRunner | None = None
        self._hung: list[asyncio.Event] = []
        self.url = ""

    # --- state ------------------------------------------------------------------------------
    def load_dump(self, name: str) -> None:
        """Replace the table with the AORs of a recorded ``ul_dump`` (e.g. ul_dump_end_A.json)."""
        self.aors = recorded_dump_aors(name)

    def load_show_contact(self, name: str) -> None:
        """Add/replace one AOR from a recorded ``ul_show_contact`` response."""
        result = load_sample("mi", name)["response"]["result"]
        self.aors[result["AOR"]] = copy.deepcopy(result["Contacts"])

    def restart(self) -> None:
        """What a restarted OpenSIPS looks like to MI: every event subscription is gone."""
        self.subscriptions.clear()

    def methods_called(self, method: str) -> list[Any]:
        return [params for m, params, _ in self.calls if m == method]

    def live_subscriptions(self) -> dict[tuple[str, str], int]:
        """(event, socket) -> remaining ttl, dropping expired ones as OpenSIPS does."""
        now = time.monotonic()
        alive = {}
        for key, (expire, since) in list(self.subscriptions.items()):
            ttl = int(expire - (now - since))
            if ttl <= 0:
                del self.subscriptions[key]
            else:
                alive[key] = ttl
        return alive

    # --- server -----------------------------------------------------------------------------
    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/mi", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{bound}/mi"
        return self.url

    async def stop(self) -> None:
        for ev in self._hung:
            ev.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpensips:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", "")
        body = await request.read()
        if ctype.startswith("application/x-www-form-urlencoded"):
            await self._hang()  # recorded: the request hangs with no answer
        if not ctype.startswith("application/json"):
            request.transport.close()  # recorded: "the server closes with an empty reply"
            return web.Response()
        try:
            req = json.loads(body)
            method, params, rid = req["method"], req.get("params"), req.get("id")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"jsonrpc": "2.0", "id": None,
                                      "error": {"code": -32700, "message": "Parse error"}})
        self.calls.append((method, params, ctype))
        if self.failure and (self.fail_methods is None or method in self.fail_methods):
            if self.failure == "http500":
                return web.Response(status=500)
            if self.failure == "hang":
                await self._hang()
            if self.failure == "badjson":
                return web.Response(body=self._cut_reply[: len(self._cut_reply) // 2].encode(),
                                    content_type="application/json")
        try:
            result = self.dispatch(method, params)
        except _MiFault as fault:
            return web.json_response({"jsonrpc": "2.0", "error": fault.error, "id": rid})
        return web.json_response({"jsonrpc": "2.0", "result": result, "id": rid})

    async def _hang(self) -> None:
        ev = asyncio.Event()
        self._hung.append(ev)
        await ev.wait()
        raise web.HTTPServiceUnavailable()

    # --- MI commands (recorded shapes) ------------------------------------------------------
    def dispatch(self, method: str, params: Any) -> Any:
        named = params if isinstance(params, dict) else {}
        positional = params if isinstance(params, list) else []
        if method == "version":
            return self._version
        if method == "event_subscribe":
            event = named.get("event", positional[0] if positional else None)
            sock = named.get("socket", positional[1] if len(positional) > 1 else None)
            expire = named.get("expire", positional[2] if len(positional) > 2 else 3600)
            if expire == 0:
                self.subscriptions.pop((event, sock), None)
            else:
                self.subscriptions[(event, sock)] = (int(expire), time.monotonic())
            return "OK"
        if method == "subscribers_list":
            by_event: dict[str, list[dict]] = {}
            for (event, sock), ttl in self.live_subscriptions().items():
                expire = self.subscriptions[(event, sock)][0]
                by_event.setdefault(event, []).append(
                    {"socket": sock, "expire": expire, "ttl": ttl})
            return {"Events": [{"name": e, "id": self._event_ids.get(e, 0), "Subscribers": s}
                               for e, s in by_event.items()]}
        if method == "ul_dump":
            brief = named.get("brief", positional[0] if positional else None)
            if brief is not None and brief not in (1, "1"):
                raise _MiFault(self._bad_brief)
            aors = [{"AOR": a} if brief is not None else {"AOR": a, "Contacts": c}
                    for a, c in self.aors.items()]
            return {"Domains": [{"name": self.table, "hash_size": 16384, "AORs": aors}]}
        if method == "ul_show_contact":
            aor = named.get("aor", positional[1] if len(positional) > 1 else None)
            if aor not in self.aors or not self.aors[aor]:
                raise _MiFault(self._not_found)
            return {"AOR": aor, "Contacts": self.aors[aor]}
        if method == "ul_add":
            keys = ("table_name", "aor", "contact", "expires", "q", "flags", "cflags", "methods")
            args = [named.get(k) for k in keys] if named else positional
            if len(args) != 8 or any(a is None for a in args):
                raise _MiFault(self._ul_add_error)
            self.aors.setdefault(args[1], [])
            self.aors[args[1]] = [c for c in self.aors[args[1]] if c["Contact"] != args[2]]
            contact = dict(self._mi_contact, Contact=args[2], Expires=int(args[3]) or "permanent",
                           Q=args[4] if isinstance(args[4], str) else "0",
                           Methods=int(args[7]))
            self.aors[args[1]].insert(0, contact)
            return "OK"
        if method in ("ul_rm", "ul_rm_contact"):
            aor = named.get("aor", positional[1] if len(positional) > 1 else None)
            if aor not in self.aors:
                raise _MiFault(self._not_found)
            if method == "ul_rm":
                del self.aors[aor]
            else:
                contact = named.get("contact", positional[2] if len(positional) > 2 else None)
                self.aors[aor] = [c for c in self.aors[aor] if c["Contact"] != contact]
            return "OK"
        if method == "nh_enable_ping":
            if named or positional:
                self.natping = 1 if (positional or list(named.values()))[0] else 0
                return "OK"
            return {"Status": self.natping}
        if method == "get_statistics":
            contacts = sum(len(c) for c in self.aors.values())
            values = {"usrloc:registered_users": len(self.aors),
                      "usrloc:location-users": len(self.aors),
                      "usrloc:location-contacts": contacts,
                      "usrloc:location-expires": 0}
            return {k: values.get(k, 0) for k in self._stat_keys if k.startswith("usrloc:")}
        raise _MiFault({"code": -32601, "message": "Method not found"})  # JSON-RPC 2.0 §5.1


class _MiFault(Exception):
    def __init__(self, error: dict) -> None:
        super().__init__(error.get("message"))
        self.error = error


class FakeMiFifo:
    """OpenSIPS' side of mi_fifo: reads ``:reply:{json}`` from a FIFO, answers like the fake.

    Replies go to ``reply_dir/reply`` (mi_fifo's ``reply_dir``), which the client created.
    """

    def __init__(self, fake: FakeOpensips, fifo_path: Path, reply_dir: Path) -> None:
        self.fake = fake
        self.fifo_path = fifo_path
        self.reply_dir = reply_dir
        self._task: asyncio.Task | None = None
        self._fd: int | None = None
        self.plain_text_error: str | None = None  # answer this (MI engine error) instead

    async def start(self) -> None:
        os.mkfifo(self.fifo_path, 0o600)
        # O_RDWR keeps the FIFO open for writers even between requests (as OpenSIPS does).
        self._fd = os.open(self.fifo_path, os.O_RDWR | os.O_NONBLOCK)
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        text = ""
        decoder = json.JSONDecoder()
        while True:
            ready = loop.create_future()
            loop.add_reader(self._fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self._fd)
            with contextlib.suppress(BlockingIOError):
                text += os.read(self._fd, 65536).decode("utf-8", "replace")
            while text.startswith(":"):
                name, sep, rest = text[1:].partition(":")
                if not sep:
                    break
                try:
                    req, end = decoder.raw_decode(rest)
                except ValueError:
                    break  # incomplete request: wait for more bytes
                text = rest[end:].lstrip()
                await self._answer(name, req)
            if text and not text.startswith(":"):
                text = ""  # garbage: OpenSIPS would log and drop it

    async def _answer(self, name: str, req: dict) -> None:
        self.fake.calls.append((req.get("method"), req.get("params"), "fifo"))
        if self.plain_text_error is not None:
            reply = self.plain_text_error.encode()
        else:
            try:
                result = self.fake.dispatch(req["method"], req.get("params"))
                reply = json.dumps({"jsonrpc": "2.0", "result": result, "id": req.get("id")})
            except _MiFault as fault:
                reply = json.dumps({"jsonrpc": "2.0", "error": fault.error,
                                    "id": req.get("id")})
            reply = reply.encode()
        fd = os.open(self.reply_dir / name, os.O_WRONLY)
        try:
            os.write(fd, reply)
        finally:
            os.close(fd)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class EventSender:
    """Sends notifications to a sidecar the way OpenSIPS' event modules do."""

    def __init__(self, processes: int = 3) -> None:
        # event_datagram: each OpenSIPS process has its own socket (varying source ports)
        self._udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(processes)]
        self._next = 0
        self._writer: asyncio.StreamWriter | None = None

    def datagram(self, port: int, payload: dict | bytes, host: str = "127.0.0.1") -> None:
        data = payload if isinstance(payload, bytes) else encode_event(payload)
        sock = self._udp[self._next % len(self._udp)]
        self._next += 1
        sock.sendto(data, (host, port))

    async def connect_stream(self, port: int, host: str = "127.0.0.1") -> None:
        _, self._writer = await asyncio.open_connection(host, port)

    async def stream(self, data: bytes) -> None:
        assert self._writer is not None, "connect_stream() first"
        self._writer.write(data)
        await self._writer.drain()

    async def stream_pieces(self, payloads: Iterable[dict | bytes], cuts: Iterable[int]) -> None:
        """Concatenate payloads (no delimiter) and write them cut at the given offsets."""
        blob = b"".join(p if isinstance(p, bytes) else encode_event(p) for p in payloads)
        start = 0
        for cut in sorted(set(c for c in cuts if 0 < c < len(blob))):
            await self.stream(blob[start:cut])
            start = cut
        await self.stream(blob[start:])

    async def close_stream(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._writer = None

    async def close(self) -> None:
        await self.close_stream()
        for s in self._udp:
            s.close()


def flood(port: int, count: int, rate: float, host: str = "127.0.0.1") -> float:
    """Send ``count`` distinct E_UL_CONTACT_INSERTs (the recorded NAT insert of bob with the
    AOR, URI and Call-ID numbered) at ``rate`` per second; returns the seconds it took.

    Run it in its own process (``python -m tests.fake_opensips PORT COUNT RATE``) so that the
    sender does not share the receiver's event loop or CPU time slice.
    """
    base = load_sample("events", "E_UL_CONTACT_INSERT.nat.json")["payload"]
    base["params"]["expires"] = int(time.time()) + 3600
    datagrams = []
    for i in range(count):
        params = {**base["params"], "aor": f"user{i}", "uri": f"sip:user{i}@127.0.0.9:5070",
                  "callid": f"user{i}-cid@test"}
        datagrams.append(encode_event({**base, "params": params}))
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    t0 = time.perf_counter()
    for i, data in enumerate(datagrams):
        socks[i % len(socks)].sendto(data, (host, port))
        if i % 50 == 49:
            ahead = t0 + (i + 1) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close()
    return elapsed


if __name__ == "__main__":
    import sys

    print(flood(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))

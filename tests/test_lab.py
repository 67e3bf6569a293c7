"""The network-namespace lab (sidecar.lab.netns) is a real NAT between phones and a VIP.

The slow tests build the lab (root, ip, nft, kamailio, sipp, tcpdump; skipped with the reason
otherwise) and show what the failover tests rely on: it comes up and goes away without a trace,
a phone registers through the NAT (Kamailio stores the router's public address as
``received``), a packet from VIP:5060 passes the phone's pinhole while the same packet from a
proxy host's own address is dropped by the NAT, the pinhole still works after the VIP moved to
the other host, and a pinhole nobody refreshes closes after the conntrack timeout.

The parsers the lab reads captures and conntrack with are tested without root.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.lab.netns import (
    LAN_NET,
    NAT_PRIVATE_IP,
    NAT_PUBLIC_IP,
    PHONE_IP,
    PHONE_NET,
    REPO,
    UNSOLICITED_COUNTER,
    VIP,
    Lab,
    LabKamailio,
    PcapError,
    PcapReader,
    Pinhole,
    count_by_source,
    gratuitous_arp,
    list_namespaces,
    parse_conntrack,
    parse_frame,
    parse_pcap,
    tool_missing,
    unavailable_reason,
)

# NAT conntrack timeouts: the shared lab's (longer than a registration plus the first ping
# takes, even on a busy machine), and the one the pinhole-closing test waits out.
LAB_UDP_TIMEOUT = 15
SHORT_UDP_TIMEOUT = 2
NAT_MASK = 64  # kamailio-cfg: NAT branch flag 6


def _require_lab(*tools: str) -> None:
    reason = unavailable_reason()
    for tool in tools:
        reason = reason or tool_missing(tool)
    if reason:
        pytest.skip(reason)


def _root_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s (last {value!r})")
        time.sleep(0.02)


def _receive(sock: socket.socket, timeout: float) -> list[tuple[bytes, tuple[str, int]]]:
    """Datagrams until one arrives (then whatever is already queued), or [] after timeout."""
    sock.settimeout(timeout)
    out = []
    try:
        out.append(sock.recvfrom(4096))
        sock.setblocking(False)
        while True:
            out.append(sock.recvfrom(4096))
    except (TimeoutError, BlockingIOError):
        pass
    return out


# --- lab lifecycle ----------------------------------------------------------------------------

@pytest.mark.slow
def test_lab_comes_up_and_goes_away_without_a_trace(tmp_path) -> None:
    _require_lab()
    with Lab(workdir=tmp_path) as lab:
        names = lab.namespaces
        assert set(names) <= set(list_namespaces())
        assert lab.vip_holder() == "a"
        sleeper = lab.popen("b", ["sleep", "60"])
        assert sleeper.alive
        # Lab addresses exist only inside its namespaces.
        assert "10.20.0." not in _root_addresses() and "192.168.50." not in _root_addresses()
    assert not sleeper.alive
    assert not set(names) & set(list_namespaces())
    assert lab.timings["up_s"] < 5 and lab.timings["down_s"] < 5


@pytest.mark.slow
def test_lab_is_removed_when_the_body_raises(tmp_path) -> None:
    _require_lab()
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Lab(workdir=tmp_path, vip_on=None) as lab:
        names = lab.namespaces
        assert set(names) <= set(list_namespaces()) and lab.vip_holder() is None
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())


@pytest.mark.slow
def test_kill_ends_everything_on_one_host_and_partition_cuts_the_hosts_apart(tmp_path) -> None:
    _require_lab("tcpdump")
    with Lab(workdir=tmp_path) as lab:
        tracked = lab.popen("a", ["sleep", "60"])
        # A forked grandchild the lab never saw, like a hook started by a sidecar.
        lab.popen("a", ["sh", "-c", "sleep 61 & exec sleep 62"], owner=None)
        on_b = lab.popen("b", ["sleep", "60"])
        cap = lab.capture("a", "eth0")
        _wait(lambda: len(lab.pids("a")) >= 4, 5.0, "processes started on a")
        assert "sleep" in lab.kill("a")
        assert not tracked.alive and on_b.alive
        assert cap._process is not None and lab.pids("a") == {cap._process.proc.pid}

        b_addr = (lab.host_ip("b"), 7701)
        with lab.udp_socket("b", b_addr) as receiver, \
                lab.udp_socket("a", (lab.host_ip("a"), 7701)) as sender:
            lab.partition("a", "b")
            sender.sendto(b"during the partition", b_addr)
            lab.heal()
            sender.sendto(b"after healing", b_addr)
            # One path, in order: had the first datagram passed, it would be here first.
            assert [d for d, _ in _receive(receiver, 5.0)] == [b"after healing"]
        sent = cap.wait_for(lambda ps: sum(p.dport == 7701 for p in ps) == 2, 5.0)
        assert {p.payload for p in sent if p.dport == 7701} == {
            b"during the partition", b"after healing"}


# --- one lab with Kamailio on both hosts for the NAT tests ---------------------------------

@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory) -> Iterator[Lab]:
    _require_lab("kamailio", "sipp", "tcpdump")
    with Lab(workdir=tmp_path_factory.mktemp("lab"), udp_timeout=LAB_UDP_TIMEOUT) as lab:
        for host in ("a", "b"):
            lab.start_kamailio(host, natping_interval=1)
        yield lab


@pytest.fixture
def lab(shared_lab: Lab) -> Iterator[Lab]:
    """The shared lab, put back as each test found it: VIP on A, no proxy pinging."""
    yield shared_lab
    for kam in shared_lab.kamailio.values():
        kam.enable_ping(False)
    if shared_lab.vip_holder() != "a":
        shared_lab.move_vip("a")


def _register(lab: Lab, user: str, port: int) -> Pinhole:
    """One phone at PHONE_IP:port registers through the NAT; returns its pinhole."""
    lab.sipp_register([user], local_port=port)
    pinhole = next((p for p in lab.pinholes() if p.private == (PHONE_IP, port)), None)
    assert pinhole is not None, lab.pinholes()
    assert pinhole.remote == (VIP, 5060) and pinhole.public[0] == NAT_PUBLIC_IP
    return pinhole


def _contact(kam: LabKamailio, user: str) -> dict:
    found = [c for c in kam.contacts() if c["aor"] == user]
    assert len(found) == 1, kam.contacts()
    return found[0]


@pytest.mark.slow
def test_phone_registers_through_the_nat(lab: Lab) -> None:
    pinhole = _register(lab, "alice", 5070)
    contact = _contact(lab.kamailio["a"], "alice")
    # Kamailio saw the router's public address, not the phone's: it is really NATed.
    assert contact["received"] == f"sip:{NAT_PUBLIC_IP}:{pinhole.public[1]}"
    assert contact["uri"] == f"sip:alice@{PHONE_IP}:5070"
    assert contact["socket"] == f"udp:{VIP}:5060"
    assert contact["cflags"] & NAT_MASK
    assert pinhole.replied


@pytest.mark.slow
def test_pinhole_admits_the_vip_but_not_the_hosts_own_address(lab: Lab) -> None:
    pinhole = _register(lab, "bob", 5071)
    with lab.udp_socket("phones", (PHONE_IP, 5071)) as phone, lab.capture() as cap:
        # Kamailio's own NAT pinger on the VIP holder reaches the phone through the pinhole.
        lab.kamailio["a"].enable_ping(True)
        got = _receive(phone, 5.0)
        lab.kamailio["a"].enable_ping(False)
        assert got and got[0][1] == (VIP, 5060) and got[0][0].startswith(b"OPTIONS ")

        # The same kind of packet from host B's own address is dropped by the NAT.
        drops = lab.unsolicited_drops()
        with lab.udp_socket("b", (lab.host_ip("b"), 5060), reuse=True) as from_b:
            from_b.sendto(b"OPTIONS from b's own address", pinhole.public)
        _wait(lambda: lab.unsolicited_drops() > drops, 5.0, "NAT drops B's packet")

        # B cannot even pretend to be the VIP while A holds it: the kernel refuses to send
        # from an address the host does not have, free bind or not.
        with lab.udp_socket("b", (VIP, 5060), freebind=True, reuse=True) as fake_vip, \
                pytest.raises(OSError) as refused:
            fake_vip.sendto(b"OPTIONS from b as the VIP", pinhole.public)
        assert refused.value.errno in (errno.ENETUNREACH, errno.EINVAL, errno.EADDRNOTAVAIL)

        # A marker from VIP:5060 sent afterwards still arrives, and nothing else with it.
        with lab.udp_socket("a", (VIP, 5060), reuse=True) as from_vip:
            from_vip.sendto(b"marker from the VIP", pinhole.public)
        got = _receive(phone, 5.0)
        assert [data for data, _ in got if not data.startswith(b"OPTIONS sip:")] == [
            b"marker from the VIP"]
        packets = cap.wait_for(
            lambda ps: any(p.payload == b"marker from the VIP" for p in ps), 5.0, "marker")
    # The capture on the router's uplink shows who sent what: B's packet did leave B.
    senders = count_by_source([p for p in packets if p.dport == pinhole.public[1]])
    assert senders.get((lab.host_mac("b"), lab.host_ip("b")), 0) == 1
    assert senders.get((lab.host_mac("a"), VIP), 0) >= 2


@pytest.mark.slow
def test_after_the_vip_moves_the_other_host_reaches_the_phone(lab: Lab) -> None:
    pinhole = _register(lab, "carol", 5072)
    contact = _contact(lab.kamailio["a"], "carol")
    kam_b = lab.kamailio["b"]
    # What the sidecar's warm loading does: the contact, with received and socket, into B.
    kam_b.rpc("ul.add", "location", "carol", contact["uri"], 600, -1, ".", 0,
              contact["cflags"], -1, contact["received"], kam_b.sip_socket)
    try:
        with lab.udp_socket("phones", (PHONE_IP, 5072)) as phone, lab.capture() as cap:
            moved_in = lab.move_vip("b")
            assert lab.vip_holder() == "b" and moved_in < 5
            assert lab.router_vip_mac() in (None, lab.host_mac("b"))
            kam_b.enable_ping(True)
            got = _receive(phone, 5.0)
            kam_b.enable_ping(False)
            assert got and got[0][1] == (VIP, 5060) and b"carol" in got[0][0]
            packets = cap.stop()
            assert cap.kernel_drops() == 0
        to_phone = [p for p in packets if p.dport == pinhole.public[1]]
        assert to_phone and {p.src_mac for p in to_phone} == {lab.host_mac("b")}
    finally:
        kam_b.rpc("ul.rm", "location", "carol")


@pytest.mark.slow
def test_unrefreshed_pinhole_closes_after_the_conntrack_timeout(lab: Lab) -> None:
    lab.set_udp_timeout(SHORT_UDP_TIMEOUT)
    try:
        pinhole = _register(lab, "dave", 5073)
    finally:
        lab.set_udp_timeout(LAB_UDP_TIMEOUT)
    started = time.monotonic()
    _wait(lambda: lab.pinhole(pinhole.public[1]) is None, SHORT_UDP_TIMEOUT + 5,
          "pinhole closes")
    assert time.monotonic() - started <= SHORT_UDP_TIMEOUT + 2
    with lab.udp_socket("phones", (PHONE_IP, 5073)) as phone:
        drops = lab.unsolicited_drops()
        # The very packet that passed while the pinhole was open (VIP:5060 -> its public
        # address) is now unsolicited.
        with lab.udp_socket("a", (VIP, 5060), reuse=True) as from_vip:
            from_vip.sendto(b"too late", pinhole.public)
        _wait(lambda: lab.unsolicited_drops() > drops, 5.0, "NAT drops the late packet")
        assert _receive(phone, 0.2) == []


@pytest.mark.slow
def test_phones_that_stay_answer_the_proxys_keepalives(lab: Lab) -> None:
    phones = lab.start_phones(["erin", "frank", "grace"], timeout=10)
    try:
        assert phones.registered() == 3 and phones.alive
        with lab.capture() as cap:
            lab.kamailio["a"].enable_ping(True)
            # Each phone answers from its own pinhole: 200 OKs from the NAT's public address.
            answers = cap.wait_for(
                lambda ps: len({p.sport for p in ps if p.src == NAT_PUBLIC_IP
                                and p.payload.startswith(b"SIP/2.0 200")}) >= 3,
                5.0, "200 OK from every phone")
            lab.kamailio["a"].enable_ping(False)
        ports = {p.sport for p in answers if p.payload.startswith(b"SIP/2.0 200")}
        assert ports <= {h.public[1] for h in lab.pinholes()}
    finally:
        phones.stop()
    assert not phones.alive


# --- parsers (no root needed) -------------------------------------------------------------

def _pcap(frames: list[bytes]) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 100 + i, 500, len(frame), len(frame)) + frame
    return out


def _udp_frame(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return bytes.fromhex("02000a1400fe02000a14000b0800") + ip + udp


def test_pcap_reader_reads_udp_and_arp_frames() -> None:
    udp = _udp_frame(VIP, 5060, NAT_PUBLIC_IP, 40000, b"\x00\x00\x00\x00")
    arp = gratuitous_arp("02:00:0a:14:00:0c", VIP)
    data = _pcap([udp, arp])
    packets = parse_pcap(data + data[24:30])  # a record cut short at the end is skipped
    assert len(packets) == 2
    first, second = packets
    assert (first.src, first.sport, first.dst, first.dport) == (VIP, 5060, NAT_PUBLIC_IP, 40000)
    assert first.payload == b"\x00" * 4 and first.src_mac == "02:00:0a:14:00:0b"
    assert first.ts == pytest.approx(100.0005)
    assert second.ethertype == 0x0806 and second.dst_mac == "ff:ff:ff:ff:ff:ff"
    reader = PcapReader()  # fed in pieces, as a capture file grows
    pieces = [reader.feed(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert [p for piece in pieces for p in piece] == packets
    assert count_by_source(packets) == {("02:00:0a:14:00:0b", VIP): 1,
                                        ("02:00:0a:14:00:0c", ""): 1}


def test_gratuitous_arp_announces_the_address_in_both_forms() -> None:
    for reply in (False, True):
        frame = gratuitous_arp("02:00:00:00:00:01", "10.20.0.100", reply=reply)
        assert len(frame) == 42 and frame[12:14] == b"\x08\x06"
        op, sender_ip, target_ip = frame[21], frame[28:32], frame[38:42]
        assert op == (2 if reply else 1)
        assert sender_ip == target_ip == socket.inet_aton("10.20.0.100")


def test_pcap_reader_rejects_what_it_cannot_read() -> None:
    with pytest.raises(PcapError):
        parse_pcap(b"\x00" * 24)
    with pytest.raises(PcapError):
        parse_pcap(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113))
    assert parse_pcap(b"") == []


def test_conntrack_lines_become_pinholes() -> None:
    text = (
        "ipv4     2 udp      17 28 src=192.168.50.10 dst=10.20.0.100 sport=5070 dport=5060 "
        "src=10.20.0.100 dst=10.20.0.254 sport=5060 dport=41234 [ASSURED] mark=0 zone=0 use=2\n"
        "ipv4     2 udp      17 3 src=192.168.50.10 dst=10.20.0.100 sport=5071 dport=5060 "
        "[UNREPLIED] src=10.20.0.100 dst=10.20.0.254 sport=5060 dport=5071 mark=0 use=2\n"
        "ipv4     2 tcp      6 7 ESTABLISHED src=1.2.3.4 dst=5.6.7.8 sport=1 dport=2 "
        "src=5.6.7.8 dst=1.2.3.4 sport=2 dport=1 mark=0 use=1\n"
        "garbage\n")
    assert parse_conntrack(text) == [
        Pinhole(("192.168.50.10", 5070), ("10.20.0.100", 5060), ("10.20.0.254", 41234), 28,
                True),
        Pinhole(("192.168.50.10", 5071), ("10.20.0.100", 5060), ("10.20.0.254", 5071), 3,
                False),
    ]


def test_docker_compose_has_the_labs_topology() -> None:
    text = (REPO / "compose" / "docker-compose.yml").read_text()
    for value in (VIP, Lab.host_ip("a"), Lab.host_ip("b"), NAT_PUBLIC_IP, NAT_PRIVATE_IP,
                  PHONE_IP, str(LAN_NET), str(PHONE_NET), "masquerade random",
                  f'counter name "{UNSOLICITED_COUNTER}" drop', "WITH_FREE_BIND"):
        assert value in text, value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_frame_and_pcap_parsers_never_crash(data: bytes) -> None:
    parse_frame(0.0, data)
    for blob in (data, _pcap([data]), _pcap([data])[: 24 + len(data) // 2]):
        with contextlib.suppress(PcapError):
            parse_pcap(blob)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_conntrack_parser_never_crashes(text: str) -> None:
    assert isinstance(parse_conntrack("ipv4 2 udp 17 " + text), list)


def test_open_file_limit_is_raised_for_big_sipp_runs() -> None:
    import resource

    from sidecar.lab.netns import LabError, ensure_open_files

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ensure_open_files(soft)  # already enough: nothing changes
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    if soft < hard:  # the soft limit can always go up to the hard one
        ensure_open_files(hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # beyond the hard limit needs CAP_SYS_RESOURCE: raised, or a clear error
        ensure_open_files(hard + 1000)
    except LabError as exc:
        assert "cannot be raised" in str(exc) and str(hard + 1000) in str(exc)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
    else:
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= hard + 1000

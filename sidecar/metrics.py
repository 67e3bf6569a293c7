"""Prometheus exposition of the node's counters, read at scrape time.

Nothing on the hot path touches prometheus_client: the replica, store and links keep plain
integer counters, and this collector turns them into metric families only when /metrics is
scraped, so metrics cost nothing per change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .daemon import Daemon


class NodeMetrics:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def describe(self):  # prometheus_client calls this at registration
        return []

    def collect(self):
        node = self.node
        r = node.replica
        g = GaugeMetricFamily("sidecar_contacts", "Contacts in the local replica")
        g.add_metric([], len(r.store))
        yield g
        g = GaugeMetricFamily("sidecar_aors", "AORs in the local replica")
        g.add_metric([], r.store.aor_count)
        yield g
        g = GaugeMetricFamily("sidecar_epoch", "Current fencing epoch")
        g.add_metric([], r.outbox.epoch)
        yield g
        g = GaugeMetricFamily("sidecar_last_seq_sent", "Sequence number of the last change sent")
        g.add_metric([], r.outbox.last_seq)
        yield g
        c = CounterMetricFamily("sidecar_store_ops", "Store operations by kind",
                                labels=["op"])
        for k in r.store.stats.__slots__:
            c.add_metric([k], getattr(r.store.stats, k))
        yield c
        c = CounterMetricFamily("sidecar_replica_changes", "Replica changes by kind",
                                labels=["kind"])
        for k in r.stats.__slots__:
            c.add_metric([k], getattr(r.stats, k))
        yield c
        c = CounterMetricFamily("sidecar_published", "Publisher counters", labels=["kind"])
        for k in r.outbox.stats.__slots__:
            c.add_metric([k], getattr(r.outbox.stats, k))
        if node.publisher is not None:
            for k in node.publisher.stats.__slots__:
                c.add_metric([k], getattr(node.publisher.stats, k))
        yield c
        lag = GaugeMetricFamily("sidecar_peer_lag_changes", "Changes published by the peer "
                                "and not applied here", labels=["peer"])
        link = GaugeMetricFamily("sidecar_peer_link_live", "1 when the link applies live "
                                 "batches in sequence", labels=["peer"])
        fl = CounterMetricFamily("sidecar_peer_events", "Per-peer follower counters",
                                 labels=["peer", "event"])
        errs = CounterMetricFamily("sidecar_peer_frame_errors", "Bad frames from a peer",
                                   labels=["peer", "reason"])
        for s in node.subscribers:
            peer = str(s.peer_id)
            f = s.follower
            lag.add_metric([peer], f.lag)
            link.add_metric([peer], 1 if f.state.value == "live" else 0)
            for k in f.stats.__slots__:
                fl.add_metric([peer, k], getattr(f.stats, k))
            for reason, n in s.errors.items():
                errs.add_metric([peer, reason], n)
        yield from (lag, link, fl, errs)
        ae = CounterMetricFamily("sidecar_antientropy", "Anti-entropy rounds against a peer: "
                                 "rounds, skipped, errors, buckets compared/differing/fetched, "
                                 "records put/dropped/kept/refused/changed",
                                 labels=["peer", "event"])
        ae_last = GaugeMetricFamily("sidecar_antientropy_last_round_seconds",
                                    "Duration of the last completed anti-entropy round",
                                    labels=["peer"])
        for s in node.subscribers:
            peer = str(s.peer_id)
            st = s.ae_stats
            for k in st.__slots__:
                if k not in ("last_round_s", "last_differing"):
                    ae.add_metric([peer, k], getattr(st, k))
            ae_last.add_metric([peer], st.last_round_s)
        yield from (ae, ae_last)
        c = CounterMetricFamily("sidecar_source_events", "Per-source counters (messages, "
                                "parse errors, changes, drops)", labels=["source", "event"])
        for source, counters in node.source_status().items():
            for k, v in counters.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    c.add_metric([source, k], v)
        yield c

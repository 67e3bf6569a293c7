"""Role arbitration (DESIGN §6): which node of the pair is active, and moving the role safely.

* :mod:`.arbiter` - Binary-Star state machine, epochs, fencing, backoff, operator commands
  (sans-I/O: events with ``now`` in, action objects out);
* :mod:`.checkpoints` - asyncio probes (heartbeat age, SIP OPTIONS, TCP, HTTP, command) and
  the runner that feeds their results to the arbiter;
* :mod:`.hooks` - time-limited operator commands (before/after failover, on demote);
* :mod:`.vip` - VIP add/remove with ARP probe and gratuitous ARP
  (also ``python -m sidecar.role.vip``).

Submodules are not imported here so that importing the arbiter stays cheap (no scapy/aiohttp).
"""

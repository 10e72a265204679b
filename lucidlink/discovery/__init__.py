"""
The discovery service: which metadata server serves filespace X?

Metadata servers register and heartbeat (:mod:`.announcer` is their side);
discovery keeps that soft state (:mod:`.registry`) after checking each
message's MAC (:mod:`.auth`), answers clients from it or from a static map
(:mod:`.static_map`, :mod:`.service`), and sheds load before it can pile up
(:mod:`.shedding`).  :mod:`.tap` assembles ``twistd lucid-discovery``.
"""

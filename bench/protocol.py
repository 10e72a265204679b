"""
Benchmark of the lucidlink wire protocol against a minimal framed echo.

1. Codec: encode + decode of a typical metadata request (Lookup) and its
   answer (Entry), against framing the same bytes with Twisted's
   Int32StringReceiver in memory.
2. In memory, both ends: a client and a server connection joined by
   StringTransports, 64 requests in flight, no TLS and no sockets; the CPU
   each end spends per request, against Int32StringReceiver doing the same.
   This is the Python cost of the protocol alone, and steady on a busy machine.
3. Loopback TLS: requests per second with 64 in flight on one connection,
   against Int32StringReceiver over the same kind of TLS connection, sending
   the same request bytes and answered with as many bytes as lucid's answer.
   Each server runs in a child process; the CPU each end spends per request
   is reported too (it holds up better than rates on a busy machine).

Target: the lucid protocol reaches at least 60% of the echo's request rate.
Prints a table, then one line of JSON.

    python bench/protocol.py [--seconds 3] [--in-flight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from lucidlink.protocol.codec import FrameDecoder, encode_frame
from lucidlink.protocol.connection import ClientConnection, IResponder, ServerConnection, ServerFactory
from lucidlink.protocol.messages import (
    PROTOCOL_VERSION,
    Attributes,
    Entry,
    FileKind,
    Flags,
    Lookup,
    ServerStatus,
    Welcome,
)
from lucidlink.protocol.network import connect_tls, listen_tls
from lucidlink.tls import client_tls_options, init_ca, issue_certificate, server_tls_options

SERVER_NAME = "bench.lucid"
TARGET_RATIO = 0.6
REQUEST = Lookup(1, os.urandom(48))
ANSWER = Entry(Attributes(7, FileKind.FILE, 0o100644, 1, 1000, 1000, 4 << 20, 1, 2, 3, 1))
# What the baseline sends and answers: lucid's frames without their length
# prefix, which Int32StringReceiver adds, so both carry the same bytes.
REQUEST_STRING = encode_frame(REQUEST, 5)[4:]
ANSWER_STRING = encode_frame(ANSWER, 5, Flags.RESPONSE)[4:]


# ---------------------------------------------------------------------------
# 1. codec in memory


def _rate(function: Any, seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            function()
        count += 200
    return count / (time.perf_counter() - start)


def codec_rates(seconds: float) -> tuple[float, float]:
    """(lucid round trips per second, Int32StringReceiver round trips per second)."""
    decoder = FrameDecoder()

    def lucid() -> None:
        decoder.feed(encode_frame(REQUEST, 5))
        decoder.feed(encode_frame(ANSWER, 5, Flags.RESPONSE))

    receiver = Int32StringReceiver()
    receiver.stringReceived = lambda string: None  # type: ignore[method-assign]
    receiver.makeConnection(StringTransport())

    def echo() -> None:
        receiver.dataReceived(len(REQUEST_STRING).to_bytes(4, "big") + REQUEST_STRING)
        receiver.dataReceived(len(ANSWER_STRING).to_bytes(4, "big") + ANSWER_STRING)

    return _rate(lucid, seconds), _rate(echo, seconds)


# ---------------------------------------------------------------------------
# 2. servers (child process)


@implementer(IResponder)
class LookupResponder:
    """Answers every Lookup with the same Entry."""

    def welcome(self, connection: Any, hello: Any) -> Welcome:
        return Welcome(PROTOCOL_VERSION, "bench", 1, 15000, ServerStatus.SERVING)

    def respond(self, connection: Any, message: Any) -> Any:
        return ANSWER

    def connection_ended(self, connection: Any, reason: Any) -> None:
        pass


class Echo(Int32StringReceiver):
    """Answers every string at once with a string the size of lucid's answer."""

    MAX_LENGTH = 16 * 1024 * 1024

    def stringReceived(self, string: bytes) -> None:
        self.sendString(ANSWER_STRING)


def serve(kind: str, certs: Path, port_file: Path) -> None:
    """Run the ``kind`` server until killed, writing its port to ``port_file``."""
    from twisted.internet import reactor

    if kind == "lucid":
        factory: Factory = ServerFactory(LookupResponder(), reactor, keepalive_interval=0, max_in_flight=4096)
    else:
        factory = Factory.forProtocol(Echo)
    options = server_tls_options(certs / "server.pem", certs / "server.key")

    def listening(port: Any) -> None:
        port_file.write_text(str(port.getHost().port))

    listen_tls(reactor, "tcp:0:interface=127.0.0.1", options, factory).addCallback(listening)
    profile_to = os.environ.get("LUCID_BENCH_PROFILE")
    if profile_to:
        import cProfile
        import signal

        profiler = cProfile.Profile()
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
        profiler.runcall(reactor.run)  # type: ignore[attr-defined]
        profiler.dump_stats(f"{profile_to}.{kind}")
        return
    reactor.run()  # type: ignore[attr-defined]


def start_server(kind: str, certs: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = certs / f"{kind}.port"
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--certs", str(certs)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit(f"the {kind} server did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


# ---------------------------------------------------------------------------
# 3. clients (this process)


class EchoClient(Int32StringReceiver):
    """Keeps ``in_flight`` strings outstanding and counts the echoes."""

    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, payload: bytes, in_flight: int) -> None:
        self.payload = payload
        self.in_flight = in_flight
        self.answered = 0
        self.running = True

    def start(self) -> None:
        for _ in range(self.in_flight):
            self.sendString(self.payload)

    def stringReceived(self, string: bytes) -> None:
        self.answered += 1
        if self.running:
            self.sendString(self.payload)


def describe_tls(transport: Any) -> str:
    """The TLS version and cipher a connection negotiated."""
    handle = transport.getHandle()
    return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Window:
    """Requests answered, wall time and CPU of both ends over one measuring window."""

    def __init__(self, server_pid: int, count: int) -> None:
        self.server_pid = server_pid
        self.count = count
        self.start = time.perf_counter()
        self.client_cpu = time.process_time()
        self.server_cpu = process_cpu(server_pid)

    def close(self, count: int) -> dict[str, float]:
        answered = count - self.count
        return {
            "rate": answered / (time.perf_counter() - self.start),
            "client_us": (time.process_time() - self.client_cpu) / answered * 1e6,
            "server_us": (process_cpu(self.server_pid) - self.server_cpu) / answered * 1e6,
        }


@defer.inlineCallbacks
def measure_echo(reactor: Any, port: int, ca_file: Path, seconds: float, in_flight: int, server_pid: int) -> Any:
    endpoint = wrapClientTLS(client_tls_options(ca_file, SERVER_NAME), clientFromString(reactor, f"tcp:127.0.0.1:{port}"))
    client = EchoClient(REQUEST_STRING, in_flight)
    yield connectProtocol(endpoint, client)
    client.start()

    yield task.deferLater(reactor, 0.5, lambda: None)  # warm up
    window = Window(server_pid, client.answered)
    yield task.deferLater(reactor, seconds, lambda: None)
    figures = window.close(client.answered)
    figures["tls"] = describe_tls(client.transport)
    client.running = False
    client.transport.loseConnection()
    return figures


@defer.inlineCallbacks
def measure_lucid(reactor: Any, port: int, ca_file: Path, seconds: float, in_flight: int, server_pid: int) -> Any:
    connection = yield connect_tls(reactor, f"tcp:127.0.0.1:{port}", ca_file, SERVER_NAME, keepalive_interval=0)
    state = {"answered": 0, "running": True}

    def ask(_: Any = None) -> None:
        state["answered"] += 1
        if state["running"]:
            connection.request(REQUEST).addCallback(ask)

    for _ in range(in_flight):
        connection.request(REQUEST).addCallback(ask)
    yield task.deferLater(reactor, 0.5, lambda: None)
    window = Window(server_pid, state["answered"])
    yield task.deferLater(reactor, seconds, lambda: None)
    figures = window.close(state["answered"])
    figures["tls"] = describe_tls(connection.transport)
    state["running"] = False
    yield task.deferLater(reactor, 0.2, lambda: None)
    yield connection.close("benchmark over")
    return figures


# ---------------------------------------------------------------------------
# 4. both ends in memory


class _EchoAsker(Int32StringReceiver):
    """Keeps ``in_flight`` strings outstanding until ``total`` are answered."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.answered = 0

    def stringReceived(self, string: bytes) -> None:
        self.answered += 1
        if self.answered < self.total:
            self.sendString(REQUEST_STRING)


def _join(client: Any, server: Any) -> Callable[[], tuple[float, float]]:
    """Connect two protocols in memory; returns what carries bytes between them."""
    to_server, to_client = StringTransport(), StringTransport()
    client.makeConnection(to_server)
    server.makeConnection(to_client)

    def carry() -> tuple[float, float]:
        """Until both ends are quiet; the CPU seconds each end spent."""
        client_cpu = server_cpu = 0.0
        clock = time.process_time
        while data := to_server.value():
            to_server.clear()
            before = clock()
            server.dataReceived(data)
            between = clock()
            reply = to_client.value()
            to_client.clear()
            client.dataReceived(reply)
            client_cpu += clock() - between
            server_cpu += between - before
        return client_cpu, server_cpu

    return carry


def memory_costs(requests: int, in_flight: int) -> dict[str, tuple[float, float]]:
    """(client, server) CPU µs per request of lucid and of Int32StringReceiver, in memory."""

    def lucid() -> tuple[float, float]:
        clock = task.Clock()
        client = ClientConnection(clock, keepalive_interval=0)
        server = ServerConnection(clock, LookupResponder(), keepalive_interval=0, max_in_flight=4096)
        carry = _join(client, server)
        carry()  # the handshake
        answered = [0]

        def ask(_: Any = None) -> None:
            answered[0] += 1
            if answered[0] < requests:
                client.request(REQUEST).addCallback(ask)

        for _ in range(in_flight):
            client.request(REQUEST).addCallback(ask)
        client_cpu, server_cpu = carry()
        return client_cpu / answered[0] * 1e6, server_cpu / answered[0] * 1e6

    def echo() -> tuple[float, float]:
        client, server = _EchoAsker(requests), Echo()
        carry = _join(client, server)
        for _ in range(in_flight):
            client.sendString(REQUEST_STRING)
        client_cpu, server_cpu = carry()
        return client_cpu / client.answered * 1e6, server_cpu / client.answered * 1e6

    results: dict[str, tuple[float, float]] = {}
    for kind, run in (("echo", echo), ("lucid", lucid)):
        # The least of a few runs: what the code costs, with less of the noise of others.
        runs = [run() for _ in range(5)]
        results[kind] = (min(r[0] for r in runs), min(r[1] for r in runs))
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import reactor

    codec_lucid, codec_echo = codec_rates(args.seconds)
    memory = memory_costs(args.memory_requests, args.in_flight)
    with tempfile.TemporaryDirectory() as scratch:
        certs = Path(scratch)
        init_ca(certs / "ca")
        issue_certificate(certs / "ca", [SERVER_NAME], certs / "server")
        rates: dict[str, list[dict[str, float]]] = {"echo": [], "lucid": []}

        @defer.inlineCallbacks
        def measure() -> Any:
            servers = {kind: start_server(kind, certs) for kind in ("echo", "lucid")}
            try:
                # Alternate the two, so that a noisy moment on a shared
                # machine falls on both; the medians are compared.
                for _ in range(args.rounds):
                    for kind, measurer in (("echo", measure_echo), ("lucid", measure_lucid)):
                        process, port = servers[kind]
                        figures = yield measurer(
                            reactor, port, certs / "ca" / "ca.pem", args.seconds, args.in_flight, process.pid
                        )
                        rates[kind].append(figures)
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(10)

        finished: list[Any] = []
        measure().addBoth(finished.append).addBoth(lambda _: reactor.stop())
        reactor.run()  # type: ignore[attr-defined]
        if finished and hasattr(finished[0], "raiseException"):
            finished[0].raiseException()
    tls = {kind: sorted({window.pop("tls") for window in rates[kind]}) for kind in rates}

    def median(kind: str, figure: str) -> float:
        return statistics.median(window[figure] for window in rates[kind])

    results = {kind: median(kind, "rate") for kind in rates}
    ratio = results["lucid"] / results["echo"]
    return {
        "benchmark": "protocol",
        "codec_lucid_round_trips_per_s": round(codec_lucid),
        "codec_int32_framing_round_trips_per_s": round(codec_echo),
        "codec_ratio": round(codec_lucid / codec_echo, 3),
        "memory_cpu_us_per_request": {
            kind: {"client": round(client, 2), "server": round(server, 2)} for kind, (client, server) in memory.items()
        },
        "memory_ratio": round(sum(memory["echo"]) / sum(memory["lucid"]), 3),
        "tls_lucid_requests_per_s": round(results["lucid"]),
        "tls_echo_requests_per_s": round(results["echo"]),
        "tls_ratio": round(ratio, 3),
        "tls_round_ratios": [round(ours["rate"] / theirs["rate"], 3) for theirs, ours in zip(rates["echo"], rates["lucid"])],
        "tls_cpu_us_per_request": {
            kind: {end: round(median(kind, f"{end}_us"), 2) for end in ("client", "server")} for kind in rates
        },
        "tls": tls,
        "request_bytes": len(REQUEST_STRING) + 4,
        "answer_bytes": len(ANSWER_STRING) + 4,
        "in_flight": args.in_flight,
        "rounds": args.rounds,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure and round")
    parser.add_argument("--in-flight", type=int, default=64, help="requests outstanding on the connection")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each; medians compared")
    parser.add_argument("--memory-requests", type=int, default=50_000, help="requests per in-memory run")
    parser.add_argument("--serve", choices=["lucid", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.certs, args.certs / f"{args.serve}.port")
        return
    result = run(args)
    print(f"{'figure':<44}{'lucid':>12}{'baseline':>12}{'ratio':>8}")
    print(f"{'codec round trips/s (Lookup + Entry)':<44}{result['codec_lucid_round_trips_per_s']:>12,}"
          f"{result['codec_int32_framing_round_trips_per_s']:>12,}{result['codec_ratio']:>8.2f}")
    print(f"{'TLS requests/s, ' + str(args.in_flight) + ' in flight':<44}{result['tls_lucid_requests_per_s']:>12,}"
          f"{result['tls_echo_requests_per_s']:>12,}{result['tls_ratio']:>8.2f}")
    memory = result["memory_cpu_us_per_request"]
    for end in ("client", "server"):
        print(f"{'in memory, CPU µs per request, ' + end:<44}{memory['lucid'][end]:>12.2f}{memory['echo'][end]:>12.2f}")
    print(f"{'in memory, requests per CPU second':<44}{'':>24}{result['memory_ratio']:>8.2f}")
    cpu = result["tls_cpu_us_per_request"]
    for end in ("client", "server"):
        print(f"{'TLS, CPU µs per request, ' + end:<44}{cpu['lucid'][end]:>12.2f}{cpu['echo'][end]:>12.2f}")
    print(f"ratio of each round: {', '.join(f'{r:.2f}' for r in result['tls_round_ratios'])}")
    print(f"both: {result['request_bytes']}-byte requests, {result['answer_bytes']}-byte answers, "
          f"{args.in_flight} in flight; TLS lucid {', '.join(result['tls']['lucid'])}, "
          f"baseline {', '.join(result['tls']['echo'])}")
    print(f"target: TLS ratio >= {TARGET_RATIO}: {'met' if result['meets_target'] else 'NOT met'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

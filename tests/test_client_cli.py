"""
``lucid discovery resolve``: its output, and its errors and exit codes from the
real command in a subprocess against stand-in discovery instances on loopback TLS.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from lucidlink.cli.discovery import render_json, render_text, resolve_filespace
from lucidlink.cli.main import main
from lucidlink.client.config import load_config
from lucidlink.client.endpoint_cache import FILE_NAME
from lucidlink.protocol.messages import ServerStatus
from lucidlink.tls import init_ca
from tests.discovery_standin import LoopbackDiscovery, StandInDiscovery, resolved

ANSWERS = {
    "demo": resolved("demo", ("tcp:10.0.0.5:7100", "tcp:10.0.0.6:7100")),
    "waking": resolved("waking", (), status=ServerStatus.RESTORING, ttl_ms=1500),
}


class ResolveCommandTests(TestCase):
    """The command against stand-in discovery instances over real TLS."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.ca_dir = self.base / "ca"
        init_ca(self.ca_dir)
        self.discovery = yield self.start(StandInDiscovery(ANSWERS))
        self.environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LUCID_", "XDG_"))
        }
        self.environ["HOME"] = str(self.home)

    @defer.inlineCallbacks
    def start(self, responder: StandInDiscovery, **options: Any) -> Any:
        instance = yield LoopbackDiscovery.start(self.ca_dir, responder, **options)
        self.addCleanup(instance.stop)
        return instance

    @defer.inlineCallbacks
    def lucid(self, *arguments: str) -> Any:
        """Run the real ``lucid`` command: (exit status, stdout, stderr)."""
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "lucidlink.cli.main", *arguments],
            env=self.environ,
            path=str(self.base),
            reactor=reactor,
        )
        return status, out.decode(), err.decode()

    def write_config(self, *endpoints: str) -> Path:
        path = self.base / "etc" / "client.ini"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            "[client]\n"
            "discovery =\n" + "".join(f"    {endpoint}\n" for endpoint in endpoints)
            + f"ca = {os.path.relpath(self.ca_dir / 'ca.pem', path.parent)}\n"
            "state_dir = state\n"
        )
        return path

    # -- in process: the asynchronous core and what it prints ---------------

    @defer.inlineCallbacks
    def test_core_and_rendering(self) -> Any:
        """The core asks discovery as the config says; the text and JSON say everything it answered."""
        config = load_config(self.write_config(self.discovery.endpoint), environ=self.environ)
        location = yield resolve_filespace(reactor, config, "demo", 5.0)
        self.assertEqual(
            render_text(location).splitlines(),
            [
                "demo: serving",
                "endpoint: tcp:10.0.0.5:7100",
                "endpoint: tcp:10.0.0.6:7100",
                "identity: meta.demo.lucid",
                "ttl: 30 s",
                f"answered by: {self.discovery.endpoint}",
            ],
        )
        self.assertEqual(
            json.loads(render_json(location)),
            {
                "filespace": "demo",
                "status": "serving",
                "endpoints": ["tcp:10.0.0.5:7100", "tcp:10.0.0.6:7100"],
                "identity": "meta.demo.lucid",
                "ttl_ms": 30000,
                "answered_by": self.discovery.endpoint,
            },
        )
        waking = yield resolve_filespace(reactor, config, "waking", 5.0)
        self.assertEqual(render_text(waking).splitlines()[:2], ["waking: restoring", "endpoint: (none)"])
        self.assertIn("ttl: 1.5 s", render_text(waking))

    def test_missing_named_config(self) -> None:
        """A --config file that is not there: one line on stderr, exit 1, no reactor needed."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        missing = self.base / "missing.ini"
        self.assertEqual(main(["--config", str(missing), "discovery", "resolve", "demo"]), 1)
        self.assertEqual(stderr.getvalue(), f"lucid: no client config file at {missing} (named by --config)\n")

    def test_no_discovery_configured(self) -> None:
        """Without discovery endpoints anywhere, the error says how to give them."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(os, "environ", self.environ)
        self.assertEqual(main(["discovery", "resolve", "demo", "--ca", str(self.ca_dir / "ca.pem")]), 1)
        self.assertTrue(stderr.getvalue().startswith("lucid: no discovery endpoints are configured: give --discovery"))

    # -- the real command in a subprocess ------------------------------------

    @defer.inlineCallbacks
    def test_json_from_config_file(self) -> Any:
        """With LUCID_CONFIG naming a file: one JSON object, exit 0, and the answer cached in its state_dir."""
        config = self.write_config(self.discovery.endpoint)
        self.environ["LUCID_CONFIG"] = str(config)
        status, out, err = yield self.lucid("discovery", "resolve", "demo", "--json")
        self.assertEqual((status, err), (0, ""))
        answer = json.loads(out)
        self.assertEqual(answer["status"], "serving")
        self.assertEqual(answer["endpoints"], ["tcp:10.0.0.5:7100", "tcp:10.0.0.6:7100"])
        cached = json.loads((config.parent / "state" / FILE_NAME).read_text())
        self.assertEqual(cached["filespaces"]["demo"]["identity"], "meta.demo.lucid")

    @defer.inlineCallbacks
    def test_not_registered(self) -> Any:
        """A filespace discovery does not know: exit 1 with one clear line."""
        status, out, err = yield self.lucid(
            "discovery", "resolve", "ghost", "--discovery", self.discovery.endpoint, "--ca", str(self.ca_dir / "ca.pem")
        )
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "lucid: no filespace named 'ghost' is registered with discovery\n")

    @defer.inlineCallbacks
    def test_no_instance_answers(self) -> Any:
        """One instance refuses connections, one has the wrong identity: both named, exit 1."""
        gone = yield self.start(StandInDiscovery(ANSWERS))
        yield gone.stop()
        impostor = yield self.start(StandInDiscovery(ANSWERS), names=("evil.example",))
        status, out, err = yield self.lucid(
            "discovery", "resolve", "demo", "--timeout", "1",
            "--discovery", gone.endpoint, impostor.endpoint, "--ca", str(self.ca_dir / "ca.pem"),
        )
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("lucid: no discovery instance answered for 'demo' ("), err)
        self.assertIn(f"{gone.endpoint} refused the connection", err)
        self.assertIn(
            f"{impostor.endpoint}: the server's identity did not match: expected 'discovery.lucid',"
            " but its certificate carries evil.example",
            err,
        )
        self.assertEqual(impostor.responder.requests, 0)

    @defer.inlineCallbacks
    def test_wrong_identity_fails_fast(self) -> Any:
        """When every instance's certificate is refused, the command says so without waiting out its timeout."""
        started = reactor.seconds()
        status, out, err = yield self.lucid(
            "discovery", "resolve", "demo", "--discovery", self.discovery.endpoint,
            "--ca", str(self.ca_dir / "ca.pem"), "--discovery-identity", "discovery.other",
        )
        self.assertLess(reactor.seconds() - started, 8)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("identity did not match: expected 'discovery.other'", err)

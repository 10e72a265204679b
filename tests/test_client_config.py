"""
Client settings: command line, then environment, then config file, then default;
paths relative to the file; a missing named file is an error, a missing default file is not.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.client.config import DEFAULT_DISCOVERY_IDENTITY, config_file_path, load_config

FULL_FILE = """\
[client]
discovery =
    tcp:d1.example:7000
    tcp:d2.example:7000   # the second
ca = ca/ca.pem
discovery_identity = discovery.example
user = alice
state_dir = state
cache_dir = /var/cache/lucid-alice
passphrase_file = ~/secret
"""


class ConfigTests(SynchronousTestCase):
    """Where each setting comes from."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.environ = {"HOME": str(self.home)}

    def write(self, text: str, path: Path | None = None) -> Path:
        path = path or self.base / "etc" / "client.ini"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def test_defaults_without_a_file(self) -> None:
        """No default file: every setting has its default."""
        config = load_config(environ=self.environ)
        self.assertIsNone(config.path)
        self.assertEqual(config.discovery, ())
        self.assertIsNone(config.ca)
        self.assertEqual(config.discovery_identity, DEFAULT_DISCOVERY_IDENTITY)
        self.assertIsNone(config.user)
        self.assertEqual(config.state_dir, self.home / ".local" / "state" / "lucid")
        self.assertEqual(config.cache_dir, self.home / ".cache" / "lucid")

    def test_xdg_folders(self) -> None:
        """XDG base folders move the default file, state and cache; relative ones are ignored."""
        self.environ.update(XDG_STATE_HOME="/xdg/state", XDG_CACHE_HOME="relative/cache",
                            XDG_CONFIG_HOME=str(self.base / "xdg"))
        self.write("[client]\nuser = bob\n", self.base / "xdg" / "lucid" / "client.ini")
        config = load_config(environ=self.environ)
        self.assertEqual(config.user, "bob")
        self.assertEqual(config.state_dir, Path("/xdg/state/lucid"))
        self.assertEqual(config.cache_dir, self.home / ".cache" / "lucid")

    def test_file_settings_relative_to_file(self) -> None:
        """Settings from the file; its relative paths start at its folder, ~ is the home."""
        path = self.write(FULL_FILE)
        config = load_config(path, environ=self.environ)
        self.assertEqual(config.path, path)
        self.assertEqual(config.discovery, ("tcp:d1.example:7000", "tcp:d2.example:7000"))
        self.assertEqual(config.ca, path.parent / "ca" / "ca.pem")
        self.assertEqual(config.discovery_identity, "discovery.example")
        self.assertEqual(config.user, "alice")
        self.assertEqual(config.state_dir, path.parent / "state")
        self.assertEqual(config.cache_dir, Path("/var/cache/lucid-alice"))
        self.assertEqual(config.passphrase_file, Path("~/secret").expanduser())

    def test_precedence(self) -> None:
        """Command line over environment over file over default, setting by setting."""
        path = self.write(FULL_FILE)
        self.environ.update(
            LUCID_DISCOVERY="tcp:env1:7000, tcp:env2:7000",
            LUCID_CA="env-ca.pem",
            LUCID_USER="",  # empty: unset
            LUCID_STATE_DIR="/env/state",
        )
        config = load_config(
            path,
            environ=self.environ,
            overrides={"discovery": None, "ca": Path("cli-ca.pem"), "user": None, "discovery_identity": None},
        )
        self.assertEqual(config.discovery, ("tcp:env1:7000", "tcp:env2:7000"))  # environment
        self.assertEqual(config.ca, Path("cli-ca.pem"))  # command line, relative to the working folder
        self.assertEqual(config.user, "alice")  # file
        self.assertEqual(config.discovery_identity, "discovery.example")  # file
        self.assertEqual(config.state_dir, Path("/env/state"))  # environment
        config = load_config(path, environ=self.environ, overrides={"discovery": ["tcp:cli:1"]})
        self.assertEqual(config.discovery, ("tcp:cli:1",))

    def test_lucid_config_names_the_file(self) -> None:
        """LUCID_CONFIG replaces the default file; --config replaces LUCID_CONFIG."""
        from_environment = self.write("[client]\nuser = env-file\n", self.base / "a.ini")
        from_option = self.write("[client]\nuser = option-file\n", self.base / "b.ini")
        self.environ["LUCID_CONFIG"] = str(from_environment)
        self.assertEqual(load_config(environ=self.environ).user, "env-file")
        self.assertEqual(load_config(from_option, environ=self.environ).user, "option-file")
        self.assertEqual(config_file_path(None, self.environ), (from_environment, "LUCID_CONFIG"))

    def test_named_file_missing_is_an_error(self) -> None:
        """A file named by --config or LUCID_CONFIG must exist, and the error says who named it."""
        missing = self.base / "nope.ini"
        with self.assertRaises(errors.NotFound) as caught:
            load_config(missing, environ=self.environ)
        self.assertIn(str(missing), str(caught.exception))
        self.assertIn("--config", str(caught.exception))
        self.environ["LUCID_CONFIG"] = str(missing)
        with self.assertRaises(errors.NotFound) as caught:
            load_config(environ=self.environ)
        self.assertIn("LUCID_CONFIG", str(caught.exception))

    def test_unknown_setting_is_an_error(self) -> None:
        """A misspelt setting is reported with the known ones, not ignored."""
        path = self.write("[client]\ndiscovry = tcp:a:1\n")
        with self.assertRaises(errors.InvalidArgument) as caught:
            load_config(path, environ=self.environ)
        self.assertIn("'discovry'", str(caught.exception))
        self.assertIn("discovery", str(caught.exception))

    def test_malformed_file_is_an_error(self) -> None:
        """A file that is not INI is reported with its path, on one line."""
        path = self.write("discovery = outside any section\n")
        with self.assertRaises(errors.InvalidArgument) as caught:
            load_config(path, environ=self.environ)
        self.assertIn(str(path), str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_other_sections_ignored(self) -> None:
        """Sections other than [client] are left to whoever reads them."""
        path = self.write("[mount]\nanything = 1\n[client]\nuser = carol\n")
        self.assertEqual(load_config(path, environ=self.environ).user, "carol")

    def test_require(self) -> None:
        """Commands that need discovery or a CA are told how to give them."""
        config = load_config(environ=self.environ)
        with self.assertRaises(errors.InvalidArgument) as caught:
            config.require_discovery()
        self.assertIn("--discovery", str(caught.exception))
        self.assertIn("LUCID_DISCOVERY", str(caught.exception))
        with self.assertRaises(errors.InvalidArgument) as caught:
            config.require_ca()
        self.assertIn("--ca", str(caught.exception))
        config = load_config(environ=self.environ, overrides={"ca": self.base / "absent.pem"})
        with self.assertRaises(errors.NotFound):
            config.require_ca()

"""The twistd plugins are found, by name, wherever the package is installed."""

from __future__ import annotations

import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase


class PluginTests(SynchronousTestCase):
    """Both services are twistd plugins."""

    def test_both_tapnames_found(self) -> None:
        """getPlugins(IServiceMaker) finds lucid-discovery and lucid-meta."""
        names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
        self.assertIn("lucid-discovery", names)
        self.assertIn("lucid-meta", names)

    def test_twistd_help_lists_both(self) -> None:
        """``twistd --help`` lists both commands."""
        output = subprocess.run(
            [sys.executable, "-m", "twisted", "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        self.assertIn("lucid-discovery", output)
        self.assertIn("lucid-meta", output)

    def test_plugin_modules_are_cheap(self) -> None:
        """Importing a plugin file imports nothing of lucidlink."""
        code = (
            "import sys, importlib.util\n"
            "for name in ('lucid_discovery', 'lucid_meta'):\n"
            "    spec = importlib.util.find_spec('twisted.plugins.' + name)\n"
            "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lucidlink')))\n"
        )
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(output.stdout.strip(), "[]", output.stderr)

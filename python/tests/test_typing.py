"""The package's types from a user's side: `mypy --strict` accepts typed_usage.py (e.g. `job.id`
on what `submit` returns). Skipped where mypy is not installed; CI installs it."""

import importlib.util
import os
import subprocess
import sys
import unittest
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent


@unittest.skipIf(importlib.util.find_spec("mypy") is None, "mypy is not installed (pip install mypy)")
class TypingTest(unittest.TestCase):
    def test_user_code_type_checks_strictly(self):
        env = dict(os.environ, MYPYPATH=str(TESTS_DIR.parent))
        run = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(TESTS_DIR / "typed_usage.py")],
            capture_output=True, text=True, env=env, cwd=TESTS_DIR.parent,
        )
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)

    def test_a_wrong_attribute_is_caught(self):
        bad = "import gpuflow\n\ndef f(c: gpuflow.Client) -> str:\n    return c.submit('p').identifier\n"
        run = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-c", bad],
            capture_output=True, text=True, env=dict(os.environ, MYPYPATH=str(TESTS_DIR.parent)), cwd=TESTS_DIR.parent,
        )
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("identifier", run.stdout)


if __name__ == "__main__":
    unittest.main()

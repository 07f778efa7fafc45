"""What a proxy that does not use a feature does not load: PyJWT and cryptography's X.509 module are imported
only by the features that need them (assertion signing, JWT expiry hints, certificate subjects, client
certificates, the forward proxy's CA): 9 MiB less after importing the app, 2–3 MiB less in a serving worker
(issue 14's target: ≤ 80 MiB per worker). Run in a fresh interpreter: this test process has imported everything
already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import proxy.cli.main, proxy.app
from proxy.config import models
models.load(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "jwt" or m.startswith(("jwt.", "cryptography.x509")))))
"""


def probe(config: Path, then: str = "") -> list[str]:
    """The output lines of PROBE (then ``then``) run on ``config`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE + then, str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_the_example_config_loads_neither_pyjwt_nor_x509():
    assert json.loads(probe(ROOT / "config" / "example.yaml")[-1]) == []


def test_a_certificate_subject_is_still_checked_once_x509_is_loaded_for_it():
    before, attributes, after = probe(ROOT / "config" / "example.yaml", """
from proxy.config.fields import subject_attributes
print(sorted(subject_attributes("CN=billing,O=acme,EMAILADDRESS=ops@acme.test")))
print("cryptography.x509" in sys.modules)
""")[-3:]
    assert json.loads(before) == []
    assert attributes == "[('CN', 'billing'), ('EMAILADDRESS', 'ops@acme.test'), ('O', 'acme')]"
    assert after == "True"

"""Self-test of conftest.py's KVM gate and --strict-skips guard (needs neither KVM nor kvmkit).

Each case runs pytest in a subprocess on a scratch directory holding a copy of this suite's
conftest.py (and the support.py it imports) whose KVM device path is redirected to a file
that does or does not exist.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
DEVICE_LINE = 'KVM_DEVICE = "/dev/kvm"'

CASES = {
    # name: (test file body, fake /dev/kvm exists, --strict-skips, exit code, text expected in the output)
    "kvm-skip-without-device": (
        "import pytest\n@pytest.mark.kvm\ndef test_a():\n    pass\n",
        False,
        True,
        0,
        "no /dev/kvm",
    ),
    "kvm-marker-runs-with-device": (
        "import pytest\n@pytest.mark.kvm\ndef test_a():\n    pass\n",
        True,
        True,
        0,
        "1 passed",
    ),
    "kvm-fixture-skip-without-device": ("def test_a(make_vm):\n    pass\n", False, True, 0, "no /dev/kvm"),
    "fake-kvm-skip-with-device": (
        "import pytest\ndef test_a():\n    pytest.skip('no /dev/kvm')\n",
        True,
        True,
        1,
        "fake-kvm exists)",
    ),
    "other-skip": (
        "import pytest\ndef test_a():\n    pytest.skip('not today')\n",
        False,
        True,
        1,
        "SKIPPED test_case.py::test_a: not today",
    ),
    "other-skip-not-strict": (
        "import pytest\ndef test_a():\n    pytest.skip('not today')\n",
        False,
        False,
        0,
        "1 skipped",
    ),
    "skipif-marker": (
        "import pytest\n@pytest.mark.skipif(True, reason='never')\ndef test_a():\n    pass\n",
        False,
        True,
        1,
        "test_a: never",
    ),
    "module-level-skip": (
        "import pytest\npytest.skip('whole module', allow_module_level=True)\n",
        False,
        True,
        1,
        "whole module",
    ),
    "importorskip": (
        "import pytest\npytest.importorskip('kvmkit_no_such_module')\n",
        False,
        True,
        1,
        "kvmkit_no_such_module",
    ),
    "xfail": (
        "import pytest\n@pytest.mark.xfail(reason='later')\ndef test_a():\n    assert False\n",
        False,
        True,
        1,
        "xfail: later",
    ),
    "failure-stays-failure": (
        "import pytest\ndef test_a():\n    pytest.skip('x')\ndef test_b():\n    assert False\n",
        False,
        True,
        1,
        "1 failed",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_strict_skips(tmp_path, case):
    body, device_exists, strict, want_rc, want_text = CASES[case]
    device = tmp_path / "fake-kvm"
    if device_exists:
        device.write_text("")
    conftest = CONFTEST.read_text()
    assert conftest.count(DEVICE_LINE) == 1, "conftest.py no longer defines KVM_DEVICE as expected"
    (tmp_path / "conftest.py").write_text(conftest.replace(DEVICE_LINE, f"KVM_DEVICE = {str(device)!r}"))
    (tmp_path / "test_case.py").write_text(body)
    # conftest.py imports the helpers it shares with the benchmarks.
    shutil.copy(CONFTEST.with_name("support.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}

    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsx", str(tmp_path)]
    proc = subprocess.run(
        args + (["--strict-skips"] if strict else []),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = proc.stdout + proc.stderr
    assert proc.returncode == want_rc, output
    assert want_text in output, output

"""Optional engines and runtimes are extras: the core imports none of them, neither at import nor
to load a model on a path that does not use them (one fresh interpreter for every check)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("ray", "onnx", "onnxruntime")


@pytest.mark.integration  # a subprocess loading the bundled model twice
def test_the_core_imports_no_optional_extra():
    code = ("import sys, json, captioner, captioner.api, captioner.batch.command, captioner.batch.ray_engine, "
            "captioner.cli; captioner.cli.build_parser(); from captioner.api import Captioner; "
            "Captioner.default(precision='fp32'); Captioner.default(precision='bf16'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (EXTRAS,))
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads(finished.stdout.strip().splitlines()[-1]) == []

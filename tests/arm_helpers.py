"""Running ARM builds in tests: the cached arm64 rootfs under qemu (:mod:`qcompile.targets.arm.rootfs`)
and :mod:`tests.arm_runner` inside it.

Tests marked ``arm`` need ``qemu-aarch64-static``, ``debootstrap`` and ``g++-aarch64-linux-gnu``
(``.ci/run`` installs them and makes the rootfs).  Locally a missing tool skips them; in CI (``CI`` set)
it fails them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from qcompile.targets.arm import CROSS_CXX
from qcompile.targets.arm import rootfs as arm_rootfs

__all__ = ["arm_python", "run_on_arm", "ArmPython"]

RUNNER = Path(__file__).with_name("arm_runner.py")


class ArmPython:
    """The rootfs and a staged copy of this checkout's runtime, ready to run jobs."""

    def __init__(self, root: Path, pythonpath: Path):
        self.root = root
        self.pythonpath = pythonpath

    def run(self, jobs: list[dict], workdir: Path) -> list[float]:
        """Run :mod:`tests.arm_runner` jobs in one emulated process; each job's seconds (load + run)."""
        spec = workdir / f"jobs-{len(list(workdir.glob('jobs-*.json')))}.json"
        spec.write_text(json.dumps(jobs))
        arm_rootfs.run_python(self.root, [str(RUNNER), str(spec)], pythonpath=self.pythonpath, timeout=900)
        result = json.loads(spec.with_suffix(".result.json").read_text())
        assert result["machine"] == "aarch64"
        return result["seconds"]


@pytest.fixture(scope="session")
def arm_python(tmp_path_factory) -> ArmPython:
    missing = arm_rootfs.missing_tools() + ([] if shutil.which(CROSS_CXX) else ["g++-aarch64-linux-gnu"])
    if missing:
        message = f"ARM tests need {missing} (apt-get install {' '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = arm_rootfs.ensure_rootfs()
    return ArmPython(root, arm_rootfs.stage_runtime(tmp_path_factory.mktemp("arm-pythonpath")))


def run_on_arm(arm: ArmPython, workdir: Path, artifacts: dict[str, tuple[Path, dict]]) -> tuple[dict, dict]:
    """Run each artifact on its feeds under qemu: ({key: {output name: array}}, {key: seconds})."""
    jobs = []
    for key, (path, feeds) in artifacts.items():
        np.savez(workdir / f"{key}-in.npz", **feeds)
        jobs.append({"kind": "artifact", "path": str(path), "feeds": str(workdir / f"{key}-in.npz"),
                     "out": str(workdir / f"{key}-out.npz")})
    seconds = arm.run(jobs, workdir)
    outs = {key: dict(np.load(workdir / f"{key}-out.npz")) for key in artifacts}
    return outs, dict(zip(artifacts, seconds))

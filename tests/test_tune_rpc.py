"""Remote tuning: a real TVM RPC tracker and servers on loopback; trials spread over the servers, and a
server killed mid-run costs its trials, not the run."""

from __future__ import annotations

import threading
import time

import onnx
import pytest

from qcompile.compiler.driver import CompileOptions
from qcompile.compiler.tune import tune_model
from qcompile.runtime.errors import QCompileError
from qcompile.targets import resolve_target, tuning
from qcompile.targets.rpc_local import LoopbackCluster
from tests.helpers import mlp_model, save

pytestmark = pytest.mark.slow  # about 2-4 minutes on 2 cores: tracker, servers and a dozen trials


def static_mlp() -> onnx.ModelProto:
    model = mlp_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    return model


def test_trials_spread_over_servers_and_survive_a_killed_one(tmp_path):
    save(static_mlp(), tmp_path / "mlp.onnx")
    with LoopbackCluster(servers=2, key="qtest") as cluster:
        assert tuning.tracker_servers(cluster.tracker, "qtest") == 2
        killed_after = []

        def kill_server_0_mid_run():
            deadline = time.monotonic() + 600
            while cluster.sessions(0) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            killed_after.append(cluster.sessions(0))
            cluster.kill(0)

        killer = threading.Thread(target=kill_server_0_mid_run)
        killer.start()
        report = tune_model(tmp_path / "mlp.onnx", CompileOptions(bpw=16), tmp_path / "db", trials=4,
                            tracker=cluster.tracker, key="qtest", time_model=False)
        killer.join()
        served = [cluster.sessions(0), cluster.sessions(1)]

    assert killed_after and killed_after[0] >= 2  # server 0 measured trials, then died mid-run
    assert served[1] > 0  # the other server measured too, and after the kill it measured alone
    res = report.result
    assert res.tasks and res.tuned  # the run completed and committed records
    db = tuning.open_database(tmp_path / "db", resolve_target("x86").tvm)
    assert sum(tuning.has_record(db, t.mod) for t in res.tasks) >= len(res.tasks) - len(res.failed)
    # the kernel timings after the kill ran on the surviving server
    assert any(k.tuned_s is not None for k in report.kernels)


def test_unknown_key_is_a_clear_error(tmp_path):
    with LoopbackCluster(servers=1, key="present") as cluster:
        with pytest.raises(QCompileError, match="no RPC server is registered"):
            tuning.rpc_runner(cluster.tracker, "absent")

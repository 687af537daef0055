"""Multi-host DP-SGD with jax.distributed: two processes of two CPU devices each, talking
through a coordinator on localhost, against one process of four devices.

Each process holds only its shard of the rows. Same parameters as the single-process run
show that (1) every host drew the same global Poisson batch and fed exactly its shard,
and (2) the noise was drawn once per step for all hosts (a per-host draw would differ).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "multi":
        jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2, process_id=int(sys.argv[4]))
    import numpy as np
    from dpnf_jax.data.stream import ArrayRows
    from dpnf_jax.flows.model import FlowConfig
    from dpnf_jax.privacy.sampling import shard_bounds
    from dpnf_jax.train import dp_fit

    assert jax.device_count() == 4, jax.devices()
    config = FlowConfig(dim=3, num_blocks=2, hidden=(8,))
    x = np.random.default_rng(0).normal(size=(401, 3)).astype(np.float32)
    mesh = jax.make_mesh((4,), ("data",))
    if mode == "multi":
        p = jax.process_index()
        lo, hi = shard_bounds(len(x), 2)[p : p + 2]
        rows = ArrayRows(x[lo:hi], num_rows=len(x), row_offset=int(lo))  # this host sees only its rows
    else:
        rows = x
    result = {}
    runs = [("fast", 7), ("vmap", 7)] + ([("fast", None)] if mode == "multi" else [])
    for method, noise_seed in runs:  # None: OS entropy, which process 0 must broadcast
        params, report = dp_fit(config, rows, epsilon=2.0, delta=1e-4, epochs=1, batch_size=40, seed=1,
                                method=method, verbose=False, mesh=mesh, noise_seed=noise_seed)
        name = f"{method}-{noise_seed}"
        result[name] = [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(params)]
        result[name + "-epsilon"] = report.epsilon
    json.dump(result, open(out, "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # These tests compare results, not speed: skipping XLA's backend optimisation halves their compile time.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _two_processes(command, extra_env=lambda i, address: {}, timeout: float = 600) -> list[tuple[int, str]]:
    """Run ``command(process_id, coordinator_address)`` as 2 processes of 2 CPU devices each
    (with ``extra_env(process_id, address)`` added to the environment); their (exit code,
    stderr). A hang (say, a host waiting for a broadcast that never comes) fails the test
    within ``timeout`` seconds in all, and kills both processes."""
    address = f"127.0.0.1:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, *command(i, address)], env={**_env(2), **extra_env(i, address)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for worker in workers:
            _, err = worker.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((worker.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish within {timeout} s (a host hung)")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    script = root / "worker.py"
    script.write_text(WORKER)
    single = subprocess.run([sys.executable, str(script), "single", str(root / "single.json")], env=_env(4),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for code, err in _two_processes(lambda i, address: [str(script), "multi", str(root / f"multi-{i}.json"), address,
                                                         str(i)]):
        assert code == 0, err[-3000:]
    return [json.loads((root / name).read_text()) for name in ("single.json", "multi-0.json", "multi-1.json")]


def _max_relative(a, b) -> float:
    return max(float(np.max(np.abs(np.subtract(u, v))) / (np.max(np.abs(u)) + 1e-12)) for u, v in zip(a, b))


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_two_hosts_reach_the_one_host_parameters(runs, method):
    """Same noise seed: 2 processes x 2 devices (each with half the rows) = 1 process x 4 devices."""
    single, host0, host1 = runs
    name = f"{method}-7"
    assert _max_relative(single[name], host0[name]) < 1e-4
    assert host0[name] == host1[name]
    assert host0[name + "-epsilon"] == single[name + "-epsilon"]


def test_hosts_share_process_zeros_noise_seed(runs):
    """Without a noise seed each process draws OS entropy; process 0's is broadcast, so
    both hold identical parameters (different seeds would make the replicas diverge)."""
    _, host0, host1 = runs
    assert host0["fast-None"] == host1["fast-None"]
    assert _max_relative(host0["fast-None"], host0["fast-7"]) > 1e-3  # it really is another noise draw


def test_cli_on_two_hosts_streams_shards_and_releases_histograms_once(tmp_path):
    """`dpnf train` on two processes (process 0 told its place by flags, process 1 by the
    DPNF_* environment): each streams its half of a Parquet file; the histogram counts are
    summed over hosts before the noise, so they equal a one-process run's with the same
    noise seed, as does the privacy spent; process 0 alone writes."""
    from dpnf_jax.cli import main
    from dpnf_jax.datasets import adult_schema, load_adult

    load_adult()[0].head(900).to_parquet(tmp_path / "t.parquet", row_group_size=200)
    adult_schema().to_json(tmp_path / "s.json")
    common = ["train", "--data", str(tmp_path / "t.parquet"), "--schema", str(tmp_path / "s.json"), "--epsilon", "2",
              "--noise-seed", "5", "--epochs", "1", "--blocks", "2", "--hidden", "8", "--batch-size", "100",
              "--rows", "50", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    flags = lambda i, address: ["--coordinator", address, "--num-processes", "2", "--process-id", "0"] if i == 0 else []
    environment = lambda i, address: {"DPNF_COORDINATOR": address, "DPNF_NUM_PROCESSES": "2",
                                      "DPNF_PROCESS_ID": "1"} if i == 1 else {}
    results = _two_processes(lambda i, address: ["-m", "dpnf_jax.cli", *common, "--out", str(tmp_path / "two"),
                                                 *flags(i, address)], extra_env=environment)
    for code, err in results:
        assert code == 0, err[-3000:]
    one, two = (json.loads((tmp_path / d / "model" / "dpnf_model.json").read_text()) for d in ("one", "two"))
    assert two["encoder"]["noisy_counts"] == one["encoder"]["noisy_counts"]
    assert two["report"]["epsilon"] == one["report"]["epsilon"] <= 2.0
    # (The parameters are not compared: a streamed row's public dequantisation noise is keyed
    # by the read chunk and prefetch group, which depend on the host layout.)
    assert {p.name for p in (tmp_path / "two").iterdir()} == {"model", "synthetic.csv", "privacy.json", "schema.json"}


def test_a_bad_row_on_one_host_stops_both_hosts(tmp_path):
    """Host 1's shard holds an unknown category: host 1 names it, host 0 stops too (no hang),
    and nothing is written."""
    from dpnf_jax.datasets import adult_schema, load_adult

    rows = load_adult()[0].head(600)
    rows["workclass"] = rows["workclass"].astype(object)
    rows.loc[rows.index[500], "workclass"] = "Astronaut"
    rows.to_parquet(tmp_path / "t.parquet", row_group_size=100)
    adult_schema().to_json(tmp_path / "s.json")
    results = _two_processes(lambda i, address: [
        "-m", "dpnf_jax.cli", "train", "--data", str(tmp_path / "t.parquet"), "--schema", str(tmp_path / "s.json"),
        "--out", str(tmp_path / "out"), "--quiet", "--coordinator", address, "--num-processes", "2",
        "--process-id", str(i)])
    errors = [err for _, err in results]
    assert [code for code, _ in results] == [2, 2], errors
    assert "Astronaut" in errors[1] and "workclass" in errors[1]
    assert "process(es) [1] failed" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hosts_that_disagree_on_the_row_count_stop_before_anything_is_spent(tmp_path):
    """Hosts counting different N would cut overlapping shards and sample with different q
    (a row could join a step twice while the noise is calibrated for once): both refuse."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(
        """
        import sys
        import jax
        jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
        import numpy as np
        from dpnf_jax.data.stream import ArrayRows
        from dpnf_jax.flows.model import FlowConfig
        from dpnf_jax.privacy.sampling import shard_bounds
        from dpnf_jax.train import dp_fit

        p = jax.process_index()
        n = 401 if p == 0 else 399  # host 1 sees a stale, shorter copy of the table
        lo, hi = shard_bounds(n, 2)[p : p + 2]
        x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
        dp_fit(FlowConfig(dim=3, num_blocks=1, hidden=(4,)), ArrayRows(x[lo:hi], num_rows=n, row_offset=int(lo)),
               epsilon=2.0, delta=1e-4, epochs=1, batch_size=40, verbose=False, mesh=jax.make_mesh((4,), ("data",)))
        """
    ))
    results = _two_processes(lambda i, address: [str(script), address, str(i)], timeout=300)
    for code, err in results:
        assert code != 0
        assert "disagree with process 0 on the number of rows N" in err, err[-3000:]

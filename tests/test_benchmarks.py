"""The benchmark scripts, run in a tiny configuration.

``benchmarks/grad_strategies.py`` runs end to end on a tiny flow (every method, one batch
size, two rounds, memory of two methods) and its JSON is checked: structure, finite
numbers, and that every clipped path computed the same clipped gradient sum as the vmap
reference. XLA's backend optimisation is switched off for that subprocess: the test
checks outputs, not speed, and it halves the compile time that dominates the run. The
analytic MLP clipped sum of ``benchmarks/peers.py`` is checked against vmap directly.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from report_numbers import numbers

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--dim", "5", "--width", "16", "--blocks", "2", "--batch-sizes", "32", "--widths", "--depths",
        "--profile-batches", "--repeats", "2", "--memory-methods", "nonprivate", "fast", "--suffix", "test"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "grad_strategies.py"), *TINY, "--out-dir", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "grad_strategies_test.json").read_text()), out


def test_structure_and_finite_numbers(results):
    data, out = results
    assert {"environment", "settings", "methods", "points", "check", "targets", "wall_s"} <= set(data)
    assert data["environment"]["platform"] == "cpu" and data["environment"]["device_kind"]
    assert all(math.isfinite(x) for x in numbers(data))
    (point,) = data["points"]
    assert point["batch"] == 32 and point["sweeps"] == ["batch"]
    assert set(point["methods"]) == set(data["methods"]) == {
        "nonprivate", "vmap", "fast", "fast_reweight", "fast_layer", "fast_neuron", "fast_sparse"
    }
    for name, method in point["methods"].items():
        assert method["status"] == "ok", name
        step = method["step_s"]
        assert len(step["samples"]) == 2 and 0 < step["q25"] <= step["median"] <= step["q75"]
        assert method["examples_per_s"] > 0 and method["compile"]["total_s"] > 0
        assert method["ratio_to_nonprivate"]["median"] > 0
        assert all(m["temp"] >= 0 for m in method["xla_memory"].values())
    assert point["methods"]["nonprivate"]["ratio_to_nonprivate"]["median"] == 1.0
    for name in ("nonprivate", "fast"):
        memory = point["methods"][name]["memory"]
        assert memory["peak_rss_mb"] >= memory["baseline_rss_mb"] > 0
    assert "memory" not in point["methods"]["vmap"]
    assert [t["target"] for t in data["targets"]][0].startswith("fast DP step")
    assert "Same clipped gradient" in (out / "grad_strategies_test.md").read_text()


def test_every_path_computes_the_same_clipped_gradient(results):
    check = results[0]["check"]
    assert check["passed"]
    assert set(check["max_rel_diff"]) == {"vmap", "fast", "fast_reweight", "fast_layer", "fast_neuron", "fast_sparse"}
    assert all(d <= check["tolerance"] <= 1e-3 for d in check["max_rel_diff"].values())
    # The clip sits at the median norm: the comparison covers clipped and unclipped rows.
    assert 0 < check["fraction_clipped"] < 1


def test_mlp_fast_clipped_sum_matches_vmap(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import peers

    params = jax.tree.map(jnp.asarray, peers.mlp_init((3, 8, 6, 5)))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32), jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    _, norms = peers.mlp_vmap_clipped_sum(params, x, y, 1.0)
    clip = float(np.median(norms))
    reference, reference_norms = peers.mlp_vmap_clipped_sum(params, x, y, clip)
    fast, fast_norms = peers.mlp_fast_clipped_sum(params, x, y, clip)
    np.testing.assert_allclose(fast_norms, reference_norms, rtol=1e-5)
    for g, ref in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_scaling_benchmark_tiny(tmp_path):
    """benchmarks/scaling.py end to end on a tiny flow: devices 1 and 2 (forced host devices,
    an Auto-axes mesh), one small streamed table; JSON, table and plot are written."""
    pytest.importorskip("pyarrow")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    args = ["--devices", "1", "2", "--stream-rows", "3000", "--stream-steps", "12", "--batch", "64",
            "--prefetch-rows", "256", "--repeats", "2", "--blocks", "2", "--width", "16",
            "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--suffix", "test"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "scaling.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "scaling_cpu_test.json").read_text())
    assert all(math.isfinite(x) for x in numbers(data))
    points = data["devices"]["points"]
    assert [(p["devices"], p["mesh"]) for p in points] == [(1, False), (1, True), (2, True)]
    assert all(p["rows_per_s"] > 0 for p in points)
    (stream,) = data["stream"]
    assert stream["rows"] == 3000 and stream["steps"] == 12
    assert stream["passes"] == -(-12 // 4)  # 256 prefetched rows at 64 per step: 4 steps a pass
    assert (tmp_path / "out" / "scaling_cpu_test.png").stat().st_size > 0
    assert "| 3,000 |" in (tmp_path / "out" / "scaling_cpu_test.md").read_text()

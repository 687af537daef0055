"""Data-parallel DP-SGD on 4 forced host devices: same result as one device, noise drawn once."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from dpnf_jax.flows.model import FlowConfig, init_params
    from dpnf_jax.privacy import FlatClipping, PerUnitClipping
    from dpnf_jax.train import dp_fit

    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    config = FlowConfig(dim=4, num_blocks=2, hidden=(16,))
    x = np.random.default_rng(0).normal(size=(600, 4)).astype(np.float32)
    out = {}
    for method, clipper in [("fast", FlatClipping(1.0)), ("vmap", FlatClipping(1.0)),
                            ("fast", PerUnitClipping(1.0, "neuron"))]:
        kw = dict(epsilon=2.0, delta=1e-4, epochs=1, batch_size=60, seed=1, noise_seed=2,
                  clipper=clipper, method=method, verbose=False)
        single, _ = dp_fit(config, x, **kw)
        sharded, _ = dp_fit(config, x, **kw, mesh=mesh)
        diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
                   for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
        out[f"{method}-{clipper.to_dict()['type']}"] = diff
        # Parameters are replicated: every device holds the same copy after training.
        copies = [[np.asarray(shard.data) for shard in leaf.addressable_shards] for leaf in jax.tree.leaves(sharded)]
        out[f"{method}-{clipper.to_dict()['type']}-replicas"] = [
            min(len(c) for c in copies), all((c[0] == other).all() for c in copies for other in c[1:])]

    # Noise once: tiny clip bound so the update is (almost) pure noise; SGD with lr 1.
    # params_after - params_before = -(sum clipped + noise) / (qN): std sigma*C/(qN).
    C = 1e-6
    kw = dict(epsilon=1.0, delta=1e-4, epochs=0.1, batch_size=60, seed=1, noise_seed=3,
              clipper=FlatClipping(C), method="fast", verbose=False, optimizer=optax.sgd(1.0))
    params0 = init_params(config, jax.random.key(1))
    trained, report = dp_fit((config, params0), x, **kw, mesh=mesh)
    deltas = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                             zip(jax.tree.leaves(trained["conditioner"]), jax.tree.leaves(params0["conditioner"]))])
    expected = report.noise_multiplier * C / report.expected_batch_size * np.sqrt(report.steps)
    out["noise_ratio"] = float(np.std(deltas) / expected)

    # A mesh of one device is the plain single-device run.
    kw = dict(epsilon=2.0, delta=1e-4, epochs=1, batch_size=60, seed=1, noise_seed=2, method="fast", verbose=False)
    one, _ = dp_fit(config, x, **kw, mesh=jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
    plain, _ = dp_fit(config, x, **kw)
    out["one-device-mesh"] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
                                 for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(one)))

    # `dpnf train --devices 4` (CLI -> DPFlowSynthesizer(mesh=...) -> dp_fit) trains the
    # model `--devices 1` trains, on a small Adult subset with a fixed noise seed.
    import tempfile
    from pathlib import Path
    from dpnf_jax.cli import main
    from dpnf_jax.datasets import adult_schema, load_adult
    tmp = Path(tempfile.mkdtemp())
    load_adult()[0].head(400).to_csv(tmp / "t.csv", index=False)
    adult_schema().to_json(tmp / "s.json")
    # Record the mesh that reaches dp_fit: equal parameters alone would not show that the
    # CLI passed it on (a silently dropped mesh trains the single-device model too).
    import dpnf_jax.synthesizer as synthesizer_module
    meshes, real_dp_fit = [], synthesizer_module.dp_fit
    def recording_dp_fit(*args, **kwargs):
        meshes.append(None if kwargs.get("mesh") is None else kwargs["mesh"].size)
        return real_dp_fit(*args, **kwargs)
    synthesizer_module.dp_fit = recording_dp_fit
    models = {}
    for devices in (1, 4):
        code = main(["train", "--data", str(tmp / "t.csv"), "--schema", str(tmp / "s.json"), "--epsilon", "1",
                     "--noise-seed", "4", "--epochs", "1", "--blocks", "2", "--hidden", "8", "--batch-size", "100",
                     "--rows", "10", "--no-eval", "--quiet", "--devices", str(devices), "--out", str(tmp / str(devices))])
        assert code == 0, code
        with np.load(tmp / str(devices) / "model" / "params.npz") as f:
            models[devices] = {k: f[k] for k in f.files}
    out["cli-devices"] = max(float(np.max(np.abs(models[1][k] - models[4][k])) / (np.max(np.abs(models[1][k])) + 1e-12))
                             for k in models[1])
    out["cli-meshes"] = meshes
    out["cli-rows"] = sum(1 for _ in open(tmp / "4" / "synthetic.csv")) - 1
    json.dump(out, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def results():
    # Results, not speed, are checked: skipping XLA's backend optimisation halves the compile time.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # the CLI may print above it


@pytest.mark.parametrize("case", ["fast-flat", "vmap-flat", "fast-per_unit"])
def test_sharded_equals_single_device(results, case):
    assert results[case] < 1e-4
    assert results[f"{case}-replicas"] == [4, True]  # one identical copy on each of the 4 devices


def test_noise_is_drawn_once_not_per_device(results):
    # One draw gives ratio 1; a draw per device summed with psum would give 2 (sqrt(4)).
    assert 0.9 < results["noise_ratio"] < 1.1


def test_one_device_mesh_is_the_plain_run(results):
    assert results["one-device-mesh"] < 1e-5


def test_cli_devices_trains_the_single_device_model(results):
    assert results["cli-devices"] < 1e-4
    assert results["cli-meshes"] == [None, 4]  # --devices 1: no mesh; --devices 4: a 4-device mesh reached dp_fit
    assert results["cli-rows"] == 10

"""The ``dpnf`` command line: schema, train, sample, evaluate, privacy, audit.

Every command validates its input before doing work, writes its outputs atomically
(into a staging directory or temporary file that is renamed into place at the end), and
exits with status 2 and a one-line message naming what is wrong on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from dpnf_jax.data.schema import CategoricalColumn, OrdinalColumn, Schema
from dpnf_jax.fileio import atomic_write, publish_dir

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- helpers


def read_csv(path: str, schema: Schema, what: str) -> pd.DataFrame:
    """Read a CSV whose columns the schema describes (category columns read as text)."""
    if not Path(path).is_file():
        raise CLIError(f"{what} file not found: {path}")
    dtypes = {
        c.name: "string"
        for c in schema
        if isinstance(c, CategoricalColumn) or (isinstance(c, OrdinalColumn) and isinstance(c.categories[0], str))
    }
    try:
        df = pd.read_csv(path, dtype=dtypes, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CLIError(f"{what} file {path}: cannot parse CSV ({err})") from err
    missing = [n for n in schema.names if n not in df.columns]
    extra = [n for n in df.columns if n not in schema.names]
    if missing:
        raise CLIError(f"{what} file {path}: column(s) {missing} of the schema are missing")
    if extra:
        raise CLIError(f"{what} file {path}: column(s) {extra} are not in the schema")
    return df[list(schema.names)]


def load_schema(path: str) -> Schema:
    if not Path(path).is_file():
        raise CLIError(f"schema file not found: {path}")
    return Schema.from_json(Path(path).read_text())


def check_writable_dir(path: Path) -> None:
    """Fail early (before any training) if ``path`` cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dpnf-write-test-"):
            pass
    except OSError as err:
        raise CLIError(f"output directory {path} is not writable ({err.strerror or err})") from err


@contextlib.contextmanager
def staging(out: Path, outputs: Sequence[str] = ()) -> Iterator[Path]:
    """A staging directory beside ``out``; on success its entries replace those in ``out``.

    ``outputs`` names everything this command can write: one that an earlier run left in
    ``out`` and this run did not write (say, ``report/`` after a run with ``--no-eval``)
    is removed, so ``out`` never mixes two runs' files.
    """
    created = not out.exists()
    check_writable_dir(out)
    # Staging left behind by a killed run (one run per output directory at a time).
    for stale in out.glob(".dpnf-staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".dpnf-staging-", dir=out))
    try:
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if created and not any(out.iterdir()):
                out.rmdir()
            raise
        written = sorted(stage.iterdir())
        for entry in written:
            if entry.is_dir():
                publish_dir(entry, out / entry.name)
            else:
                os.replace(entry, out / entry.name)
        for name in set(outputs) - {entry.name for entry in written}:
            stale = out / name
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, df.to_csv(index=False))


def _number_type(convert, valid, description: str):
    """An argparse type: ``convert`` the text, then require ``valid(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
positive_float = _number_type(float, lambda v: v > 0, "a positive number")
probability = _number_type(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def make_clipper(name: str, l2_clip: float, keep_fraction: float):
    from dpnf_jax.privacy import FlatClipping, PerUnitClipping, StochasticSparsification

    clippers = {
        "flat": lambda: FlatClipping(l2_clip),
        "layer": lambda: PerUnitClipping(l2_clip, "layer", "equal"),
        "neuron": lambda: PerUnitClipping(l2_clip, "neuron", "equal"),
        "layer-proportional": lambda: PerUnitClipping(l2_clip, "layer", "proportional"),
        "sparse": lambda: StochasticSparsification(FlatClipping(l2_clip), keep_fraction),
    }
    return clippers[name]()


def load_schema_events(schema_path: str, schema: Schema, args: argparse.Namespace) -> list:
    """The DP events of ``dpnf schema`` from ``<schema>.events.json``, if that file exists."""
    from dpnf_jax.data.schema_dp import events_from_dicts

    path = Path(str(schema_path) + ".events.json")
    if not path.is_file():
        if schema.provenance in ("dp", "dp-guessed-kinds"):
            print(f"warning: schema {schema_path} has provenance {schema.provenance!r} but {path} is missing: the cost "
                  "of discovering it is NOT included in epsilon", file=sys.stderr)
        return []
    try:
        events = events_from_dicts(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"schema events file {path}: not valid JSON ({err})") from err
    _say(args, f"note: {path}: composing {len(events)} schema-discovery event(s) "
         f"({', '.join(label for label, _ in events)}) into the same privacy budget")
    return events


def _column_list(values: list[str] | None) -> list[str]:
    return [name.strip() for value in values or () for name in value.split(",") if name.strip()]


def cmd_schema(args: argparse.Namespace) -> int:
    from dpnf_jax.data.schema_dp import events_file_dict, infer_dp_schema
    from dpnf_jax.privacy.accounting import epsilon_of_events
    from dpnf_jax.synthesizer import default_delta

    if not Path(args.data).is_file():
        raise CLIError(f"data file not found: {args.data}")
    bounds = {}
    if args.bounds is not None:
        if not Path(args.bounds).is_file():
            raise CLIError(f"bounds file not found: {args.bounds}")
        try:
            bounds = json.loads(Path(args.bounds).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CLIError(f"bounds file {args.bounds}: not valid JSON ({err})") from err
        if not isinstance(bounds, dict):
            raise CLIError(f"bounds file {args.bounds}: expected an object {{column: [lo, hi]}}")
    categorical, continuous = _column_list(args.categorical), _column_list(args.continuous)
    integer = _column_list(args.integer)
    out = Path(args.out)
    events_path = Path(str(out) + ".events.json")
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    try:
        header = list(pd.read_csv(args.data, nrows=0, skipinitialspace=True).columns)
        declared = set(categorical) | set(continuous) | set(integer) | set(bounds)
        unknown = sorted(declared - set(header))
        if unknown:
            raise CLIError(f"column(s) {unknown} given on the command line are not in {args.data}")
        # Declared columns are read as text: their kind, integer flag and nullability come
        # from the declarations, never from how the private values happen to read.
        df = pd.read_csv(args.data, dtype={c: "string" for c in declared}, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CLIError(f"data file {args.data}: cannot parse CSV ({err})") from err
    undeclared = [c for c in df.columns if c not in declared]
    if undeclared and args.strict_types:
        raise CLIError(f"--strict-types: declare the kind of column(s) {undeclared} "
                       "(--categorical / --continuous / --integer / --bounds)")
    if undeclared:
        print(f"warning: the kinds of column(s) {undeclared} come from pandas' reading of the CSV text "
              "(numbers vs text, integers vs decimals), which is NOT differentially private; declare "
              "them with --categorical / --continuous / --integer to avoid this (the schema is marked "
              "provenance 'dp-guessed-kinds' and the privacy report says so)", file=sys.stderr)
    delta = args.delta if args.delta is not None else default_delta(len(df)) / 10
    details = {}
    schema, events = infer_dp_schema(
        df, args.epsilon, delta,
        coarse_bounds=bounds, default_range=tuple(args.default_range), quantiles=tuple(args.quantiles),
        grid=args.grid, n_bins=args.bins, categorical_columns=categorical,
        continuous_columns=[c for c in {*continuous, *bounds, *integer} if c not in categorical],
        integer_columns=integer, max_categories=args.max_categories,
        other_label=None if args.no_other else "__other__", selection_delta=args.selection_delta,
        nullable=args.nullable, rng=args.seed, details=details,
    )
    if undeclared:
        schema = dataclasses.replace(schema, provenance="dp-guessed-kinds")
    # Events first: a schema file never exists without the record of what it cost.
    atomic_write(events_path, json.dumps(events_file_dict(events, args.epsilon, delta), indent=2))
    schema.to_json(out)
    spent = epsilon_of_events([e for _, e in events], delta) if events else 0.0
    kinds = [c.kind for c in schema]
    _say(args, f"wrote {out} ({len(schema)} columns: {kinds.count('continuous')} continuous, "
         f"{kinds.count('categorical')} categorical; provenance {schema.provenance!r}) and {events_path}")
    _say(args, f"schema discovery spent epsilon={spent:.4g} at delta={delta:.3g}; `dpnf train --schema {out}` "
         "composes these events with training (train on the same rows, with --delta >= this delta)")
    if details.get("selection_threshold") is not None:
        _say(args, f"a category needs about {details['selection_threshold']:.0f} rows to be released "
             f"(noise std per count {details['count_noise_std']:.1f})"
             + ("" if args.no_other else "; the others map to '__other__'"))
    return 0


# --------------------------------------------------------------------------- commands


TRAIN_OUTPUTS = ("model", "synthetic.csv", "privacy.json", "schema.json", "report")
SAMPLE_CHUNK = 100_000  # synthetic rows generated (and written) at a time
STREAM_DEFAULT_ROWS = 100_000  # default synthetic rows when training from a stream


def cmd_train(args: argparse.Namespace) -> int:
    process, processes = _init_distributed(args)  # before anything touches a JAX device
    from dpnf_jax.data.datasets import adult_schema, load_adult
    from dpnf_jax.data.stream import TableFile
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    if (args.dataset is None) == (args.data is None):
        raise CLIError("give exactly one of --dataset adult or --data FILE (with --schema)")
    test, table, train = None, None, None
    schema_events = []
    if args.stream and args.data is None:
        raise CLIError("--stream needs --data FILE (the bundled dataset is small and read into memory)")
    streamed = args.data is not None and (args.stream or _streams_by_default(args.data))
    if streamed and args.test is not None:
        raise CLIError("--test: a streamed table gets no evaluation report; run `dpnf evaluate` on a sample instead")
    if args.dataset == "adult":
        schema = adult_schema() if args.schema is None else load_schema(args.schema)
        train, test = load_adult()
        target = args.target or "income"
    else:
        if args.schema is None:
            raise CLIError("--data needs --schema s.json (a public schema; see `dpnf_jax.Schema`)")
        schema = load_schema(args.schema)
        if streamed:
            table = TableFile(args.data, schema, chunk_rows=args.chunk_rows, allow_extra_columns=args.allow_extra_columns)
        else:
            train = read_csv(args.data, schema, "training data")
        if args.test is not None:
            test = read_csv(args.test, schema, "test data")
        target = args.target
    if target is not None and target not in schema.names:
        raise CLIError(f"--target {target!r} is not a column of the schema")
    if args.schema is not None:
        schema_events = load_schema_events(args.schema, schema, args)
    if train is not None:
        schema.validate_frame(train)
    if streamed and args.nonprivate:
        raise CLIError("--nonprivate needs the table in memory (a CSV without --stream)")
    epsilon = None if args.nonprivate else args.epsilon
    encoding = args.categorical or args.encoding
    synth = DPFlowSynthesizer(
        schema,
        epsilon,
        args.delta,
        encoding=encoding,
        marginal_share=args.marginal_share,
        num_blocks=args.blocks,
        hidden=tuple(args.hidden),
        clipper=make_clipper(args.clipping, args.clip_norm, args.keep_fraction),
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        grad_method=args.grad_method,
        accountant=args.accountant,
        seed=args.seed,
        noise_seed=args.noise_seed,
        mesh=_mesh(args.devices, processes),
        verbose=not args.quiet and process == 0,
        schema_events=schema_events,
    )
    out = Path(args.out)
    error = None
    if process == 0:
        try:
            if processes > 1:  # one process alone checks it in staging(), which also cleans up after a failure
                check_writable_dir(out)
            if args.resume and not (out / "checkpoint").exists() and (out / "privacy.json").exists():
                raise CLIError(f"--resume: {out} holds a finished run (its checkpoint is deleted once a run is done); "
                               "nothing to resume. Training again is a new release on a new privacy budget: "
                               "drop --resume (or use another --out) if that is what you want")
        except CLIError as err:
            error = err
    if processes > 1:  # an error on process 0 must stop the others too
        from dpnf_jax.train import raise_together

        raise_together(error)
    elif error is not None:
        raise error
    started = time.perf_counter()
    fit_options = dict(checkpoint_dir=out / "checkpoint", checkpoint_every=args.checkpoint_every, resume=args.resume)
    if process != 0:  # the other processes train with process 0 and write nothing
        if streamed:
            synth.fit_stream(table, prefetch_rows=args.prefetch_rows, **fit_options)
        else:
            synth.fit(train, **fit_options)
        return 0
    evaluate = not args.no_eval and train is not None
    with staging(out, TRAIN_OUTPUTS) as stage:
        if streamed:
            synth.fit_stream(table, prefetch_rows=args.prefetch_rows, **fit_options)
        else:
            synth.fit(train, **fit_options)
        rows = args.rows or (len(train) if train is not None else min(synth.num_rows, STREAM_DEFAULT_ROWS))
        fit_seconds = time.perf_counter() - started
        synth.save(stage / "model")
        synthetic = _write_synthetic(synth, rows, stage / "synthetic.csv", args.seed, keep=evaluate)
        report = synth.privacy_report()
        report["fit_seconds"] = round(fit_seconds, 2)
        if synth.scan_seconds is not None:
            report["scan_seconds"] = round(synth.scan_seconds, 2)  # of fit_seconds: the validating pass
        (stage / "privacy.json").write_text(json.dumps(report, indent=2))
        schema.to_json(stage / "schema.json")
        if evaluate:
            _evaluate_into(stage / "report", train, synthetic, schema, test, target, synth, args.seed)
    _say(args, f"wrote {out}/ (model/, synthetic.csv with {rows} rows, privacy.json"
         + ("" if not evaluate else ", report/") + f") in {time.perf_counter() - started:.1f} s")
    if (out / "checkpoint").exists():
        if args.keep_checkpoint:
            _say(args, f"note: kept {out}/checkpoint/; it holds the PRIVATE noise seed: never publish it")
        else:  # the run is done: the checkpoint (with the noise seed) has nothing left to resume
            shutil.rmtree(out / "checkpoint")
    if report["private"]:
        _say(args, f"privacy: epsilon={report['epsilon']:.4f}, delta={report['delta']:.3g} ({report['delta_source']}) "
             "covers model/, synthetic.csv and privacy.json")
    if evaluate:
        _say(args, "note: report/ compares with the real rows and is NOT private; keep it with the data owner")
    elif streamed and not args.no_eval:
        _say(args, "note: no report/ for a streamed table (it would need the rows in memory); run "
             "`dpnf evaluate` on a sample of the rows")
    return 0


def _streams_by_default(data: str) -> bool:
    """Parquet files and glob patterns are streamed; a single CSV is read into memory unless --stream."""
    from glob import has_magic

    return has_magic(data) or Path(data).suffix.lower() in (".parquet", ".pq")


def _write_synthetic(synth, rows: int, path: Path, seed: int, keep: bool):
    """Sample ``rows`` rows into ``path`` in chunks (memory stays bounded); the frame if ``keep``.

    Up to ``SAMPLE_CHUNK`` rows this is ``synth.sample(rows, seed)``; beyond, chunk i uses
    a seed derived from (seed, i).
    """
    import numpy as np

    if rows <= SAMPLE_CHUNK:
        frame = synth.sample(rows, seed=seed)
        write_csv_atomic(frame, path)
        return frame
    parts = [] if keep else None
    with open(path, "w", newline="") as handle:
        for i, start in enumerate(range(0, rows, SAMPLE_CHUNK)):
            chunk_seed = seed if i == 0 else int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            frame = synth.sample(min(SAMPLE_CHUNK, rows - start), seed=chunk_seed)
            frame.to_csv(handle, index=False, header=i == 0)
            if keep:
                parts.append(frame)
    return pd.concat(parts, ignore_index=True) if keep else None


def _init_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """``jax.distributed.initialize`` from the flags or DPNF_* variables; (process, processes)."""
    coordinator = args.coordinator or os.environ.get("DPNF_COORDINATOR")
    count = args.num_processes if args.num_processes is not None else os.environ.get("DPNF_NUM_PROCESSES")
    index = args.process_id if args.process_id is not None else os.environ.get("DPNF_PROCESS_ID")
    explicit = [v is not None for v in (coordinator, count, index)]
    if not (args.distributed or any(explicit)):
        return 0, 1
    import jax

    if any(explicit):
        if not all(explicit):
            raise CLIError("several hosts need all of --coordinator HOST:PORT, --num-processes N and --process-id I "
                           "(or DPNF_COORDINATOR, DPNF_NUM_PROCESSES, DPNF_PROCESS_ID)")
        try:
            count, index = int(count), int(index)
        except ValueError as err:
            raise CLIError(f"--num-processes and --process-id must be integers ({err})") from err
        if not (count >= 1 and 0 <= index < count):
            raise CLIError(f"--process-id must be in [0, {count}), got {index}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index)
    else:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...)
    return jax.process_index(), jax.process_count()


def _evaluate_into(path, train, synthetic, schema, test, target, synth, seed) -> None:
    from dpnf_jax.evaluate import evaluate_synthetic, write_report

    heldout = None
    if test is not None and synth is not None:
        heldout = float(synth.log_prob(test).mean())
    metrics = evaluate_synthetic(
        train, synthetic, schema, real_test=test, target=target if test is not None else None,
        heldout_log_likelihood=heldout, seed=seed,
    )
    write_report(metrics, train, synthetic, schema, path)


def cmd_sample(args: argparse.Namespace) -> int:
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    synth = DPFlowSynthesizer.load(args.model, verbose=False)
    out = Path(args.out)
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    write_csv_atomic(synth.sample(args.rows, seed=args.seed), out)
    _say(args, f"wrote {args.rows} rows to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    schema = load_schema(args.schema)
    real = read_csv(args.real, schema, "real data")
    synthetic = read_csv(args.synthetic, schema, "synthetic data")
    test = None if args.test is None else read_csv(args.test, schema, "test data")
    if args.target is not None and args.target not in schema.names:
        raise CLIError(f"--target {args.target!r} is not a column of the schema")
    if args.target is not None and test is None:
        raise CLIError("--target needs --test (train on synthetic, test on real)")
    for what, frame in (("real", real), ("synthetic", synthetic), ("test", test)):
        if frame is not None:
            try:
                schema.validate_frame(frame)
            except ValueError as err:
                raise CLIError(f"{what} data: {err}") from err
    out = Path(args.out)
    with staging(out) as stage:
        _evaluate_into(stage, real, synthetic, schema, test, args.target, None, args.seed)
    _say(args, f"wrote {out}/ (metrics.json, report.md, marginals.png, correlations.png)")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from dpnf_jax.privacy import accounting, sampling

    if args.batch_size > args.rows:
        raise CLIError(f"--batch-size {args.batch_size} exceeds --rows {args.rows}")
    if args.delta >= 1.0 / args.rows:
        print(f"warning: delta={args.delta:g} is not below 1/N = {1 / args.rows:.3g}", file=sys.stderr)
    q, steps = sampling.steps_for_epochs(args.rows, args.batch_size, args.epochs)
    sigma = accounting.calibrate_noise_multiplier(args.epsilon, args.delta, q, steps, args.accountant)
    curve = accounting.epsilon_curve(q, sigma, steps, args.delta, num_points=args.points, accountant=args.accountant)
    result = {
        "noise_multiplier": sigma,
        "sampling_rate": q,
        "steps": steps,
        "delta": args.delta,
        "accountant": args.accountant,
        "epsilon_curve": [{"step": t, "epoch": round(t * q, 3), "epsilon": e} for t, e in curve],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"noise multiplier sigma = {sigma:.4f}  (q = {q:.6f}, T = {steps} steps, delta = {args.delta:g}, {args.accountant})")
    print("| step | epoch | epsilon |\n|---:|---:|---:|")
    for point in result["epsilon_curve"]:
        print(f"| {point['step']} | {point['epoch']:.2f} | {point['epsilon']:.4f} |")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from dpnf_jax.audit import audit
    from dpnf_jax.data.datasets import adult_schema, load_adult

    if (args.dataset is None) == (args.data is None):
        raise CLIError("give exactly one of --dataset adult or --data FILE.csv (with --schema)")
    if args.dataset == "adult":
        schema = adult_schema() if args.schema is None else load_schema(args.schema)
        train, _ = load_adult()
    else:
        if args.schema is None:
            raise CLIError("--data needs --schema s.json (a public schema; see `dpnf_jax.Schema`)")
        schema = load_schema(args.schema)
        train = read_csv(args.data, schema, "training data")
    if args.canaries < 2:
        raise CLIError(f"--canaries must be at least 2, got {args.canaries}")
    if args.guesses is not None:
        bad = [g for g in args.guesses if g % 2 or g > args.canaries]
        if bad:
            raise CLIError(f"--guesses {bad}: each must be even and at most --canaries {args.canaries}")
    if args.rows is not None:
        if args.rows > len(train):
            raise CLIError(f"--rows {args.rows} exceeds the {len(train)} training rows")
        train = train.sample(n=args.rows, random_state=args.seed).reset_index(drop=True)
    schema.validate_frame(train)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a JSON file path")
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    kwargs = dict(
        delta=args.delta, num_blocks=args.blocks, hidden=tuple(args.hidden), epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        noise_seed=args.noise_seed, verbose=not args.quiet,
    )
    epsilon = None if args.nonprivate else args.epsilon
    _say(args, f"auditing {'non-private' if epsilon is None else f'epsilon={epsilon:g}'} training on "
         f"{len(train)} rows with {args.canaries} canaries ...")
    result = audit(
        schema, train, epsilon, num_canaries=args.canaries, canary_design=args.design,
        synthesizer_kwargs=kwargs, seed=args.seed, confidence=args.confidence,
        guesses=None if args.guesses is None else tuple(args.guesses),
    )
    report = {"dataset": args.dataset or args.data, "epsilon": epsilon, **result.to_dict()}
    atomic_write(out, json.dumps(report, indent=2) + "\n")
    accountant = "none (non-private)" if result.accountant_epsilon is None else f"{result.accountant_epsilon:.4f}"
    _say(args, f"epsilon lower bound {result.epsilon_lower_bound:.4f} at {result.confidence:.0%} confidence "
         f"({result.num_correct}/{result.num_guesses} correct guesses); accountant epsilon {accountant}; "
         f"{result.wall_seconds:.1f} s; wrote {out}")
    return 0


def _mesh(devices: int, processes: int = 1):
    """A one-axis mesh over the first ``devices`` local devices (None for one device); with
    several processes, over every device of every process."""
    import jax

    if processes > 1:
        if devices != 1:
            raise CLIError("with several processes the mesh spans every device of every process: drop --devices")
        return jax.make_mesh((jax.device_count(),), ("data",))
    if devices == 1:
        return None

    available = len(jax.devices())
    if devices > available:
        raise CLIError(f"--devices {devices}: only {available} device(s) available")
    return jax.make_mesh((devices,), ("data",))


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- parser


def _default(name: str):
    """The synthesizer's own default, so the CLI and the API never drift apart."""
    from dpnf_jax.synthesizer import DPFlowSynthesizer

    return inspect.signature(DPFlowSynthesizer.__init__).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpnf", description="Differentially private synthetic tables with normalizing flows.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a DP flow and write model, synthetic rows, privacy and evaluation reports",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Train a DP flow on a table and write model/, synthetic.csv, privacy.json and report/.")
    source = train.add_argument_group("data")
    source.add_argument("--dataset", choices=["adult"], help="a bundled dataset (its public schema is built in)")
    source.add_argument("--data", help="training CSV, Parquet file or glob of files (needs --schema); Parquet and "
                        "globs are streamed in chunks, never loaded whole")
    source.add_argument("--schema", help="public schema JSON (see dpnf_jax.Schema.to_json)")
    source.add_argument("--stream", action="store_true", help="stream a CSV too (for tables larger than memory)")
    source.add_argument("--allow-extra-columns", action="store_true",
                        help="streamed files: read only the schema's columns and ignore the others")
    source.add_argument("--chunk-rows", type=positive_int, default=65536, help="rows per read chunk when streaming")
    source.add_argument("--prefetch-rows", type=positive_int, default=1 << 20,
                        help="sampled rows fetched per pass over a streamed table")
    source.add_argument("--test", help="optional held-out CSV for utility metrics")
    source.add_argument("--target", help="column for train-on-synthetic/test-on-real (adult: income)")
    priv = train.add_argument_group("privacy")
    priv.add_argument("--epsilon", type=positive_float, default=1.0, help="total privacy budget (default 1)")
    priv.add_argument("--delta", type=probability, help="default min(1e-5, 0.1/N)")
    priv.add_argument("--nonprivate", action="store_true", help="train WITHOUT privacy (reference runs only)")
    priv.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
    priv.add_argument("--clipping", choices=["flat", "layer", "neuron", "layer-proportional", "sparse"], default="flat")
    priv.add_argument("--clip-norm", type=positive_float, default=1.0, help="L2 clip bound C (the sensitivity)")
    priv.add_argument("--keep-fraction", type=probability, default=0.5, help="kept units for --clipping sparse")
    model = train.add_argument_group("model and training")
    model.add_argument("--encoding", choices=["marginal", "onehot", "ordinal"], default="marginal",
                       help="marginal: DP 1-way histograms -> Gaussian copula (default); onehot/ordinal: schema only")
    model.add_argument("--categorical", choices=["onehot", "ordinal"],
                       help="shorthand for --encoding onehot|ordinal (no DP histograms)")
    model.add_argument("--marginal-share", type=probability, default=_default("marginal_share"),
                       help="share of epsilon for the histograms")
    model.add_argument("--blocks", type=positive_int, default=_default("num_blocks"))
    model.add_argument("--hidden", type=positive_int, nargs="+", default=list(_default("hidden")))
    model.add_argument("--epochs", type=positive_float, default=_default("epochs"))
    model.add_argument("--batch-size", type=positive_int, default=_default("batch_size"))
    model.add_argument("--learning-rate", type=positive_float, default=_default("learning_rate"))
    model.add_argument("--grad-method", choices=["fast", "fast_reweight", "vmap"], default="fast")
    model.add_argument("--seed", type=int, default=0, help="public randomness: initialisation, dequantisation, sampling")
    model.add_argument("--noise-seed", type=int, default=None,
                       help="fix the PRIVATE noise (experiments only: anyone who knows it can recompute the noise)")
    model.add_argument("--devices", type=positive_int, default=1,
                       help="data-parallel DP-SGD over this many local devices (rows sharded, noise drawn once)")
    model.add_argument("--checkpoint-every", type=int, default=0,
                       help="write a crash-safe checkpoint to OUT/checkpoint every N steps (operator-side, do not share)")
    model.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint: same model and same epsilon as an uninterrupted run")
    model.add_argument("--keep-checkpoint", action="store_true",
                       help="keep OUT/checkpoint after a successful run (by default it is deleted: it holds the "
                            "private noise seed)")
    hosts = train.add_argument_group("several hosts (jax.distributed; run the same command on every host)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0 (or DPNF_COORDINATOR)")
    hosts.add_argument("--num-processes", type=positive_int, help="number of processes (or DPNF_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=int, help="this process, 0..N-1 (or DPNF_PROCESS_ID)")
    hosts.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() with cluster auto-detection (SLURM, Open MPI, TPU)")
    output = train.add_argument_group("output")
    output.add_argument("--out", required=True, help="output directory")
    output.add_argument("--rows", type=positive_int,
                        help=f"synthetic rows (default: as many as the training data; streamed: at most {STREAM_DEFAULT_ROWS})")
    output.add_argument("--no-eval", action="store_true", help="skip the evaluation report")
    output.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    train.set_defaults(func=cmd_train)

    schema = sub.add_parser("schema", help="discover a schema from a CSV under differential privacy",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            description="DP bounds (noisy histograms on a public grid) and DP category lists "
                                        "(Gaussian partition selection); writes the schema JSON and "
                                        "<out>.events.json, which `dpnf train --schema <out>` composes with training.")
    schema.add_argument("--data", required=True, help="the private CSV")
    schema.add_argument("--epsilon", type=positive_float, required=True, help="budget of schema discovery alone")
    schema.add_argument("--delta", type=probability, help="default min(1e-6, 0.01/N)")
    schema.add_argument("--bounds", help="PUBLIC coarse ranges JSON {column: [lo, hi]} (declares them continuous)")
    schema.add_argument("--default-range", type=float, nargs=2, default=[-1e9, 1e9], metavar=("LO", "HI"),
                        help="PUBLIC range of continuous columns not in --bounds (values clipped to it)")
    schema.add_argument("--quantiles", type=float, nargs=2, default=[0.01, 0.99], metavar=("LO", "HI"),
                        help="the bounds are DP estimates of these quantiles")
    schema.add_argument("--grid", choices=["auto", "linear", "log"], default="auto",
                        help="bin grid: auto = linear for --bounds columns, log otherwise")
    schema.add_argument("--bins", type=positive_int, default=64, help="bins of a linear grid")
    schema.add_argument("--categorical", action="append", metavar="COLS", help="comma-separated categorical columns")
    schema.add_argument("--continuous", action="append", metavar="COLS", help="comma-separated continuous columns")
    schema.add_argument("--integer", action="append", metavar="COLS", help="comma-separated integer columns")
    schema.add_argument("--strict-types", action="store_true", help="refuse columns whose kind is not declared")
    schema.add_argument("--max-categories", type=positive_int, default=100)
    schema.add_argument("--no-other", action="store_true", help="no '__other__' level (rare values then fail validation)")
    schema.add_argument("--selection-delta", type=probability, help="delta of category selection (default delta/2)")
    schema.add_argument("--nullable", choices=["dtype", "dp"], default="dtype",
                        help="dtype: nullable when the column type can hold missing values; dp: also a DP missing count")
    schema.add_argument("--seed", type=int, help="noise seed, FOR TESTS ONLY (default: fresh OS entropy)")
    schema.add_argument("--out", required=True, help="schema JSON to write (and <out>.events.json)")
    schema.add_argument("--quiet", action="store_true")
    schema.set_defaults(func=cmd_schema)

    sample = sub.add_parser("sample", help="sample rows from a saved model", description="Sample rows from a saved model.")
    sample.add_argument("--model", required=True, help="model directory written by `dpnf train`")
    sample.add_argument("--rows", type=positive_int, required=True)
    sample.add_argument("--out", required=True, help="output CSV")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--quiet", action="store_true")
    sample.set_defaults(func=cmd_sample)

    evaluate = sub.add_parser("evaluate", help="compare a synthetic CSV with real data",
                              description="Fidelity, utility and diagnostics of a synthetic CSV against real data.")
    evaluate.add_argument("--real", required=True, help="real training CSV")
    evaluate.add_argument("--synthetic", required=True, help="synthetic CSV")
    evaluate.add_argument("--schema", required=True, help="public schema JSON")
    evaluate.add_argument("--test", help="real held-out CSV (needed for --target)")
    evaluate.add_argument("--target", help="column for train-on-synthetic/test-on-real")
    evaluate.add_argument("--out", required=True, help="report directory")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    privacy = sub.add_parser("privacy", help="calibrate the noise for a budget and print the epsilon curve (no data)",
                             description="Calibrated noise multiplier and epsilon curve for DP-SGD settings; touches no data.")
    privacy.add_argument("--epsilon", type=positive_float, required=True)
    privacy.add_argument("--delta", type=probability, required=True)
    privacy.add_argument("--rows", type=positive_int, required=True)
    privacy.add_argument("--batch-size", type=positive_int, required=True)
    privacy.add_argument("--epochs", type=positive_float, required=True)
    privacy.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
    privacy.add_argument("--points", type=positive_int, default=10, help="points on the epsilon curve")
    privacy.add_argument("--json", action="store_true", help="print JSON instead of a table")
    privacy.set_defaults(func=cmd_privacy)
    aud = sub.add_parser("audit", help="empirical privacy audit in one training run (canaries; NOT private, needs the data)",
                         description="One-run privacy audit (Steinke, Nasr, Jagielski 2023): insert canaries with "
                                     "probability 1/2, train once, guess membership from the model's log-likelihood, "
                                     "and report a statistical lower bound on epsilon.")
    aud.add_argument("--dataset", choices=["adult"], help="a bundled dataset (its public schema is built in)")
    aud.add_argument("--data", help="training CSV (needs --schema)")
    aud.add_argument("--schema", help="public schema JSON")
    aud.add_argument("--epsilon", type=positive_float, default=1.0, help="training budget (default 1)")
    aud.add_argument("--delta", type=probability, help="default min(1e-5, 0.1/(N + canaries))")
    aud.add_argument("--nonprivate", action="store_true", help="audit training WITHOUT privacy (reference)")
    aud.add_argument("--canaries", type=positive_int, default=1000, help="number of canaries m (default 1000)")
    aud.add_argument("--design", choices=["uniform", "extreme"], default="uniform", help="canary design")
    aud.add_argument("--guesses", type=positive_int, nargs="+",
                     help="guess counts r to try (even; Bonferroni over them; default 5/10/25/50/100%% of m)")
    aud.add_argument("--confidence", type=probability, default=0.95)
    aud.add_argument("--rows", type=positive_int, help="audit on a random subset of this many training rows")
    aud.add_argument("--blocks", type=positive_int, default=_default("num_blocks"))
    aud.add_argument("--hidden", type=positive_int, nargs="+", default=list(_default("hidden")))
    aud.add_argument("--epochs", type=positive_float, default=_default("epochs"))
    aud.add_argument("--batch-size", type=positive_int, default=_default("batch_size"))
    aud.add_argument("--learning-rate", type=positive_float, default=_default("learning_rate"))
    aud.add_argument("--seed", type=int, default=0, help="audit and public randomness (canaries, coins, init)")
    aud.add_argument("--noise-seed", type=int, default=None, help="private noise seed, FOR TESTS ONLY")
    aud.add_argument("--out", required=True, help="JSON report to write")
    aud.add_argument("--quiet", action="store_true")
    aud.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dpnf {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""The method contract, checked for EVERY registered method (a file dropped into methods/ included):
listed with its paper and a label, finite steps and a bit-exact state round trip, exact resume after
a SIGKILL in the middle of a student stage and after a stop request in the middle of a student and a
generator stage, no host synchronisation in an iteration, and (pool
methods, told apart by ``Method.pool_based``) measurements that leave the method's state alone.

``DFKD_BENCH_CONTRACT_ONLY=a,b`` restricts the run to those methods (tests/test_registry.py uses it
to run the contract on a method file it drops in; see conftest.py for ``DFKD_BENCH_EXTRA_METHODS``).
"""

from __future__ import annotations

import io
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfkd_bench.train.engine import Trainer
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.method_api import list_methods
from dfkd_bench.models import build_model
from test_resume import assert_same, cli

_ONLY = [name for name in os.environ.get("DFKD_BENCH_CONTRACT_ONLY", "").split(",") if name]
METHODS = sorted(name for name in list_methods() if not _ONLY or name in _ONLY)
POOL = sorted(name for name in METHODS if list_methods()[name].pool_based)
# Pool methods finish a batch every 2 synthesis steps here, so a smoke run fills the pool,
# restarts a batch (CMI: re-initialised G; FastDFKD: a meta update) and trains on the pool.
SHORT = {"synthesis_steps": 2}


def overrides_for(method: str) -> dict:
    return dict(SHORT) if list_methods()[method].pool_based else {}


def make_trainer(digits_request, folder, method: str, **overrides) -> Trainer:
    config = build_run_configs(digits_request([method], overrides={**overrides_for(method), **overrides}))[0]
    trainer = Trainer(config, folder, device="cpu", progress=False)
    trainer.setup()
    return trainer


def tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state.flatten()]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_of(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors_of(item)]
    return []


# ------------------------------------------------------------------- listing ---

def test_every_method_is_listed_with_its_paper_and_a_label(capsys):
    from dfkd_bench.cli import main

    methods = {name: list_methods()[name] for name in METHODS}
    for name, method in methods.items():
        assert re.search(r"\(.+ (et al\.|& \w+) 20\d\d", method.summary), method.summary  # "(Fang et al. 2019"
        assert method.label, name
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name, method in methods.items():
        assert f"  {name:12s} {method.summary}" in listing


# ------------------------------------------------------------ state round trip ---

@pytest.mark.parametrize("method", METHODS)
def test_steps_are_finite_and_state_round_trip_is_exact(method, digits_request, tmp_path):
    """A few iterations give finite losses; a checkpoint taken mid-run (loaded as weights only, as
    a resume loads it) and restored into a fresh trainer gives bit-identical next iterations (pool,
    batch in progress, generators, EMA copies, memories, optimisers)."""
    first = make_trainer(digits_request, tmp_path / "a", method)
    first.start_time = second_start = time.time()  # set by Trainer.train(), which this test steps through by hand
    first.method.pretrain()
    first.run_iteration()
    first.iteration = 1
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    for _ in range(2):  # pool methods: iteration 2 finishes a batch, iteration 3 trains on the pool
        first.run_iteration()
        first.iteration += 1
    sums = {name: value.item() for name, value in first.sums.items()}
    assert "student_loss" in sums and "gen_loss" in sums
    assert all(math.isfinite(v) for v in sums.values()), sums
    if method in POOL:
        assert first.method.pool.size == first.local_batch

    second = make_trainer(digits_request, tmp_path / "b", method)
    second.start_time = second_start
    buffer.seek(0)
    second.restore(torch.load(buffer, weights_only=True))
    for _ in range(2):
        second.run_iteration()
        second.iteration += 1
    assert {name: value.item() for name, value in second.sums.items()} == sums
    for key, value in first.student_module.state_dict().items():
        assert torch.equal(value, second.student_module.state_dict()[key]), key
    flat_a = torch.cat([t.float() for t in tensors_of(first.method.state_dict())] or [torch.zeros(0)])
    flat_b = torch.cat([t.float() for t in tensors_of(second.method.state_dict())] or [torch.zeros(0)])
    assert torch.equal(flat_a, flat_b)


# ------------------------------------------------------------ SIGKILL and resume ---

def _run_args(methods: list[str], folder) -> list[str]:
    # synthesis_steps is declared by the pool methods only: a run of several methods passes it to
    # those that declare it (the others keep the run ids they have alone); a run of one other method
    # must not name it.
    overrides = SHORT if set(POOL) & set(methods) else {}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return ["run", "--methods", ",".join(methods), "--dataset", "digits", "--budget", "smoke",
            "--results-dir", str(folder), "--no-progress", *sets]


@pytest.fixture(scope="module")
def killed_and_resumed(teacher_cache, tmp_path_factory):
    """Uninterrupted smoke runs of every method (one process); the same runs each SIGKILLed in the
    middle of the student stage of iteration 3, after the checkpoint of iteration 2 (one process per
    method, two at a time, into one results folder); then all of them resumed by one command."""
    reference = tmp_path_factory.mktemp("contract-reference")
    killed = tmp_path_factory.mktemp("contract-killed")
    env = {**os.environ, "DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1",
           "DFKD_BENCH_FAULT": "mid_stage@3"}
    codes = {}
    for start in range(0, len(METHODS), 2):
        kills = {method: subprocess.Popen([sys.executable, "-m", "dfkd_bench.cli", *_run_args([method], killed)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for method in METHODS[start:start + 2]}
        codes.update({method: (process.wait(timeout=600), process.stdout.read()[-2000:])
                      for method, process in kills.items()})
    cli(_run_args(METHODS, reference), teacher_cache)
    resumed = cli(_run_args(METHODS, killed), teacher_cache, check=False)
    return reference, killed, codes, resumed


def outcome_of(results, run_name: str):
    from dfkd_bench.train.engine import NONDETERMINISTIC_RECORD_KEYS
    from dfkd_bench.store import RunStore

    store = RunStore(results, run_name)
    assert store.is_done(), run_name
    records = [{k: v for k, v in r.items() if k not in NONDETERMINISTIC_RECORD_KEYS} for r in store.read_records()]
    return records, torch.load(store.student_path, weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_stage_then_resume_is_exact(method, killed_and_resumed):
    reference, killed, codes, resumed = killed_and_resumed
    code, output = codes[method]
    assert code == -signal.SIGKILL, output
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (resumed.stdout + resumed.stderr).count("resumed from iteration 2") == len(METHODS)
    (run,) = [p.name for p in reference.iterdir() if p.name.startswith(f"{method}-")]
    assert_same(outcome_of(killed, run), outcome_of(reference, run))


@pytest.mark.parametrize("method", METHODS)
def test_a_stop_inside_a_stage_checkpoints_there_and_resumes_exactly(method, killed_and_resumed, digits_request,
                                                                     tmp_path, monkeypatch):
    """A SIGTERM during the first student step of the first iteration (of 4) and during the last generator step
    of the second (before the stage ends; a pool method's batch is then half-synthesised) checkpoints right
    after that step, in the middle of the stage; the resumed run is bit-identical to an uninterrupted one.
    A method that keeps state inside a stage must declare it (Method.stage_state_attributes)."""
    from test_stop import assert_same, outcome, stop_then_resume

    reference = killed_and_resumed[0]  # the uninterrupted runs of the SIGKILL test (one CPU thread)
    config = build_run_configs(digits_request([method], overrides=overrides_for(method)))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        messages = stop_then_resume(config, tmp_path, ["student:0:1", "generator:1:1"], monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert all("checkpoint saved there" in message for message in messages), messages
    assert_same(outcome(tmp_path, config), outcome(reference, config))


# ------------------------------------------------------------------ host syncs ---

@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory) -> str:
    """A randomly initialised ResNet-20 (with BatchNorm, so the BN-matching terms run) for digits."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(build_model("resnet20", 10, 1, 16).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_iterations_never_synchronise_the_host(method, bn_teacher, tmp_path):
    """Generator and student steps of every method, with a BatchNorm teacher and the switches a GPU
    gets (but bf16), under the guard that refuses .item(), float(), torch.tensor(number), .cpu() ..."""
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions
    from dfkd_bench.train.profiling import HostSyncGuard

    # bf16 autocast is left out: it changes no code path of the methods and is slow on a CPU.
    switches = dict(channels_last=True, fused_optimizer=True, fused_forward=True, cuda_graphs=True)
    request = RunRequest(methods=[method], dataset="digits", seeds=[0], budget="smoke", teacher_arch="resnet20",
                         student_arch="lenet5_half", overrides={**switches, **overrides_for(method)},
                         teacher=TeacherOptions(checkpoint=bn_teacher))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.build()
    trainer.method.pretrain()
    trainer.run_iteration()  # optimiser state is created
    trainer.iteration += 1
    with HostSyncGuard(raise_on_sync=False) as guard:
        for _ in range(2):  # pool methods: a batch is finished, pushed and a new one started
            trainer.run_iteration()
            trainer.iteration += 1
            trainer.track_finiteness()
    assert guard.syncs == [], guard.syncs[:5]
    # a method that promises a static student step has it replayed from one capture
    static = vars(type(trainer.method)).get("static_student_step", False)
    assert (trainer.static_step is not None) == static
    if static:
        assert trainer.static_step.captures == 1


# ------------------------------------------------------------- pool methods ---

@pytest.mark.parametrize("method", POOL)
def test_pool_measurements_leave_the_method_state_alone(method, digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, method)
    method_ = trainer.method
    snapshot = lambda: torch.cat([t.float() for t in tensors_of(method_.state_dict())])  # a copy  # noqa: E731
    method_.pretrain()
    before = snapshot()
    images = method_.measurement_sources(8, torch.Generator().manual_seed(1))["pool"]  # pool still empty
    assert images.shape == (8, *trainer.method.ctx.image_shape)
    assert torch.equal(snapshot(), before)
    for _ in range(2):
        method_.generator_step()
        method_.end_generator_stage()
    assert method_.pool.size > 0
    before = snapshot()
    method_.measurement_sources(8, torch.Generator().manual_seed(2))
    assert torch.equal(snapshot(), before)

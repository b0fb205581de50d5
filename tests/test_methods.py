"""The methods: EMA (Eq. 5), the memory bank, the contract every method must meet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfkd_bench.train.engine import Trainer, train_run
from dfkd_bench.errors import ConfigError
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.method_api import list_methods
from dfkd_bench.methods.mad import ema_update, make_ema_copy
from dfkd_bench.methods.mem import MemoryBank


def make_trainer(digits_request, tmp_path, method: str, **overrides) -> Trainer:
    config = build_run_configs(digits_request([method], overrides=overrides))[0]
    trainer = Trainer(config, tmp_path, device="cpu", progress=False)
    trainer.setup()
    return trainer


# ------------------------------------------------------------------ EMA ---

def test_ema_update_eq5_by_hand():
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)
    ema = make_ema_copy(model)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        ema.bias.fill_(1.0)
    ema_update(ema, model, momentum=0.9)
    assert ema.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)  # 1.2
    assert ema.bias.item() == pytest.approx(0.9 * 1.0 + 0.1 * -1.0)  # 0.8
    ema_update(ema, model, momentum=0.0)  # alpha = 0: copy of G
    assert ema.weight.item() == pytest.approx(3.0)
    ema_update(ema, nn.Linear(1, 1), momentum=1.0)  # alpha = 1: frozen
    assert ema.weight.item() == pytest.approx(3.0)


def test_ema_batchnorm_buffers_follow_eq5_and_sampling_does_not_move_them():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model.train()
    model(torch.randn(8, 2))  # gives the model non-trivial running stats
    ema = make_ema_copy(model)
    with torch.no_grad():
        ema[1].running_mean.fill_(1.0)
    ema_update(ema, model, momentum=0.5)
    expected = 0.5 * 1.0 + 0.5 * model[1].running_mean
    torch.testing.assert_close(ema[1].running_mean, expected)
    assert ema[1].num_batches_tracked.item() == model[1].num_batches_tracked.item()
    before = ema[1].running_mean.clone()
    ema.train()
    with torch.no_grad():
        ema(torch.randn(8, 2) * 10 + 5)  # batch statistics far from the buffers
    torch.testing.assert_close(ema[1].running_mean, before)


def test_ema_generator_never_receives_gradients(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "mad")
    method = trainer.method
    assert all(not p.requires_grad for p in method.ema_generator.parameters())
    for _ in range(2):
        method.generator_step()
    method.end_generator_stage()
    loss, _ = method.student_loss()
    loss.backward()
    assert all(p.grad is None for p in method.ema_generator.parameters())
    assert any(p.grad is not None for p in trainer.student_module.parameters())
    optimised = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in method.ema_generator.parameters()}


def test_mad_ema_is_updated_once_per_stage_after_generator_steps(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "mad", ema_momentum=0.5)
    method = trainer.method
    ema_before = [p.clone() for p in method.ema_generator.parameters()]
    method.generator_step()
    # generator steps alone do not touch the EMA generator
    for p, q in zip(method.ema_generator.parameters(), ema_before):
        torch.testing.assert_close(p, q)
    generator_now = [p.clone() for p in method.net.generator.parameters()]
    method.end_generator_stage()
    for p, old, new in zip(method.ema_generator.parameters(), ema_before, generator_now):
        torch.testing.assert_close(p, 0.5 * old + 0.5 * new)


# --------------------------------------------------------------- memory ---

def test_memory_bank_fifo_order_and_capacity():
    bank = MemoryBank(capacity=5, image_shape=(1, 1, 1), dtype="float32", device=torch.device("cpu"))
    values = lambda *v: torch.tensor(v, dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    bank.push(values(0.1, 0.2, 0.3))
    assert bank.size == 3
    torch.testing.assert_close(bank.ordered().flatten(), torch.tensor([0.1, 0.2, 0.3]))
    bank.push(values(0.4, 0.5, 0.6, 0.7))  # overwrites the two oldest
    assert bank.size == 5
    torch.testing.assert_close(bank.ordered().flatten(), torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))
    bank.push(values(*[i / 10 for i in range(8)]))  # more than capacity: only the newest 5 stay
    torch.testing.assert_close(bank.ordered().flatten(), torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))
    generator = torch.Generator().manual_seed(0)
    sample = bank.sample(100, generator)
    assert sample.shape == (100, 1, 1, 1)
    assert set(torch.round(sample.flatten() * 10).int().tolist()) <= {3, 4, 5, 6, 7}


def test_memory_bank_uint8_quantises_to_1_over_255_and_is_compact():
    bank = MemoryBank(capacity=8192, image_shape=(3, 32, 32), dtype="uint8", device=torch.device("cpu"))
    assert bank.nbytes == 8192 * 3 * 32 * 32  # 25.2 MB for CIFAR: under the 30 MB target
    images = torch.rand(10, 3, 32, 32)
    bank.push(images)
    assert (bank.ordered() - images).abs().max() <= 0.5 / 255 + 1e-6


def test_memory_bank_floor_rounding_is_the_png_pools_truncation():
    # the DataFree collection's pool: (x.clamp(0, 1) * 255).astype('uint8') -- truncation, not rounding

    images = torch.tensor([0.999, 0.5, 1.0, 0.0021, -0.1]).view(5, 1, 1, 1)
    floor = MemoryBank(5, (1, 1, 1), "uint8", torch.device("cpu"), rounding="floor")
    nearest = MemoryBank(5, (1, 1, 1), "uint8", torch.device("cpu"))
    floor.push(images)
    nearest.push(images)
    assert floor.images.flatten().tolist() == [254, 127, 255, 0, 0]
    assert nearest.images.flatten().tolist() == [255, 128, 255, 1, 0]
def test_a_pool_of_floor_levels_stores_what_the_datafree_pngs_store():
    """zju-vipa/CMI's pool: PNG files of (clamp(x, 0, 1) * 255).astype('uint8'), which truncates."""
    values = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, -0.2, 0.1]).view(-1, 1, 1, 1)
    expected = {"nearest": [0, 128, 255, 255, 255, 0, 26], "floor": [0, 127, 254, 255, 255, 0, 25]}
    for rounding, levels in expected.items():
        bank = MemoryBank(capacity=8, image_shape=(1, 1, 1), dtype="uint8", device=torch.device("cpu"),
                          rounding=rounding)
        bank.push(values)
        assert bank.ordered().mul(255).round().flatten().int().tolist() == levels
        assert bank.ordered().dtype == torch.float32  # the default dtype
    truncated = (values.clamp(0, 1).numpy() * 255).astype("uint8").flatten().tolist()
    assert truncated == expected["floor"]


def test_memory_bank_state_round_trip():
    bank = MemoryBank(capacity=4, image_shape=(1, 2, 2), dtype="uint8", device=torch.device("cpu"))
    bank.push(torch.rand(6, 1, 2, 2))
    copy = MemoryBank(capacity=4, image_shape=(1, 2, 2), dtype="uint8", device=torch.device("cpu"))
    copy.load_state_dict(bank.state_dict())
    torch.testing.assert_close(copy.ordered(), bank.ordered())
    assert (copy.size, copy.next_slot) == (bank.size, bank.next_slot)


def test_mem_pushes_one_batch_per_stage_and_trains_on_memory(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "mem", memory_size=40)
    method = trainer.method
    batch = trainer.local_batch
    method.end_generator_stage()
    _, terms = method.student_loss()
    assert method.memory.size == batch  # the first step's fresh batch was pushed
    assert "kd_memory" not in terms  # the bank was empty at that step
    _, terms = method.student_loss()
    assert method.memory.size == batch  # only one batch per stage
    assert "kd_memory" in terms and torch.isfinite(terms["kd_memory"])
    method.end_generator_stage()
    method.student_loss()
    assert method.memory.size == min(40, 2 * batch)


# ------------------------------------------------------------- contract ---

@pytest.mark.parametrize("method", sorted(list_methods()))
def test_every_method_runs_a_few_steps_with_finite_losses(method, digits_request, tmp_path):
    config = build_run_configs(digits_request([method]))[0]
    summary = train_run(config, tmp_path, device="cpu", progress=False)
    assert summary["iterations"] == config.train.total_iterations
    from dfkd_bench.store import RunStore

    records = RunStore(tmp_path, config.run_name).read_records()
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == config.train.total_iterations
    losses = {k: v for r in evals[1:] for k, v in r.items() if k.startswith("loss/")}
    assert "loss/student_loss" in losses and "loss/gen_loss" in losses  # every method reports both
    assert all(math.isfinite(v) for v in losses.values())
    assert 0.0 <= summary["final_accuracy"] <= 100.0


def test_conditional_generator_terms_and_pretraining(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "mad", conditioning="sum", nll_weight=0.1, normreg_weight=0.1,
                           pretrain_steps=2)
    method = trainer.method
    embeddings_before = method.net.class_embedding.weight.clone()
    method.pretrain()
    assert not torch.equal(embeddings_before, method.net.class_embedding.weight)  # E is trained with G
    terms = method.generator_step()
    assert {"gen_kd", "gen_nll", "gen_normreg", "gen_bound_teacher", "gen_bound_pixels"} <= set(terms)
    assert "gen_bnmm" not in terms  # LeNet teacher has no BatchNorm: skipped with a note
    assert any("BNmm" in note for note in trainer.notes)
    # pre-training steps do not use the student (KD weight 0)
    assert "gen_kd" not in method.generator_step(kd_weight=0.0)


def test_nll_without_labels_is_a_config_error(digits_request):
    with pytest.raises(ConfigError, match="conditioning"):
        build_run_configs(digits_request(["abm"], overrides={"nll_weight": 0.1}))


def test_paper_symbols_are_accepted_in_overrides(digits_request):
    from dfkd_bench.config import parse_overrides

    overrides = parse_overrides(["alpha=0.5", "lambda1=2", "n_S=3"])
    assert overrides == {"ema_momentum": 0.5, "ema_kd_weight": 2, "student_steps": 3}
    configs = build_run_configs(digits_request(["abm", "mad"], overrides=overrides))
    abm, mad = configs
    assert mad.params["ema_momentum"] == 0.5 and mad.params["ema_kd_weight"] == 2.0
    assert "ema_momentum" not in abm.params  # ABM does not declare it: same ABM run whatever alpha is
    assert abm.train.student_steps == mad.train.student_steps == 3


def test_unknown_setting_and_method_give_one_line_errors(digits_request):
    with pytest.raises(ConfigError, match="unknown setting 'ema_momentun'.*ema_momentum"):
        build_run_configs(digits_request(["mad"], overrides={"ema_momentun": 0.5}))
    with pytest.raises(ConfigError, match="unknown method 'madd'.*mad"):
        build_run_configs(digits_request(["madd"]))


def test_same_seed_gives_same_student_and_generator_init_across_methods(digits_request, tmp_path):
    abm = make_trainer(digits_request, tmp_path / "a", "abm")
    mad = make_trainer(digits_request, tmp_path / "b", "mad")
    for p, q in zip(abm.student_module.parameters(), mad.student_module.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(abm.method.net.parameters(), mad.method.net.parameters()):
        torch.testing.assert_close(p, q)

"""Optimizers, LoRA+ groups, LR schedules and pickle-free optimizer state (exact resume)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from itertools import pairwise

import pytest
import torch
from harness.comfy import import_pack, setup_inprocess
from safetensors.torch import load_file, save_file

setup_inprocess()
import_pack()
from lora_foundry.training.engine import optim  # noqa: E402

HAS_PRODIGY = importlib.util.find_spec("prodigyopt") is not None
# A learning rate that makes each optimizer converge on the toy problem.
LR = {"AdamW": 0.05, "AdamW8bit": 0.05, "Lion": 0.01, "SGD": 0.2, "Adafactor": 0.05, "Prodigy": 1.0}


def _model(seed: int = 0) -> list[torch.nn.Parameter]:
    # 64 x 64 = 4096 weights: the smallest size AdamW8bit keeps in 8 bits; the bias takes the 32-bit path.
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 64, generator=gen) * 0.1), torch.nn.Parameter(torch.zeros(64))]


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    weight, bias = params
    return ((x @ weight + bias - y) ** 2).mean()


def _train(opt, params, steps: int, sched=None) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = _loss(params)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return losses


def _build(name: str, params, lr: float | None = None, **kw):
    return optim.build_optimizer(name, [{"params": params}], LR[name] if lr is None else lr, **kw)


def _missing_prodigy_error(name: str) -> None:
    with pytest.raises(RuntimeError, match="pip install prodigyopt"):
        _build(name, _model())


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_lowers_a_quadratic_loss(name):
    if name == "Prodigy" and not HAS_PRODIGY:
        return _missing_prodigy_error(name)
    params = _model()
    opt = _build(name, params)
    losses = _train(opt, params, 20)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in params)


def test_adamw8bit_steps_on_cpu_with_8bit_state():
    params = _model()
    opt = _build("AdamW8bit", params)
    _train(opt, params, 2)
    assert opt.state[params[0]]["state1"].dtype == torch.uint8  # quantised, not the 32-bit fallback
    assert opt.state[params[1]]["state1"].dtype == torch.float32


def test_adafactor_matches_transformers_without_relative_step():
    from transformers.optimization import Adafactor as Reference

    for beta1, decay in ((None, 0.0), (0.9, 0.1)):
        ours, theirs = _model(), _model()
        opt = _build("Adafactor", ours, 0.01, weight_decay=decay, extra={"beta1": beta1})
        ref = Reference(theirs, lr=0.01, beta1=beta1, weight_decay=decay, relative_step=False,
                        scale_parameter=False, warmup_init=False)
        _train(opt, ours, 10)
        _train(ref, theirs, 10)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adafactor_keeps_low_precision_weights_in_their_dtype():
    param = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = optim.build_optimizer("Adafactor", [{"params": [param]}], 0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    assert param.dtype == torch.bfloat16 and (param < 1).all()


def test_lion_steps_by_sign_with_decoupled_weight_decay():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = optim.build_optimizer("Lion", [{"params": [param]}], 0.1, weight_decay=0.5)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    param.grad = torch.tensor([0.001, -5.0, 0.0])
    opt.step()
    decayed = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5)
    torch.testing.assert_close(param.detach(), decayed - 0.1 * torch.tensor([1.0, -1.0, 0.0]))


def test_sgd_defaults_to_momentum_and_extra_overrides_it():
    assert _build("SGD", _model()).param_groups[0]["momentum"] == 0.9
    opt = _build("SGD", _model(), extra={"momentum": 0.0, "nesterov": False})
    assert opt.param_groups[0]["momentum"] == 0.0


def test_betas_and_extra_reach_the_optimizer():
    opt = _build("AdamW", _model(), betas=(0.8, 0.95), extra={"eps": 1e-6})
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.01


def test_optimizer_errors_are_clear():
    with pytest.raises(ValueError, match="unknown optimizer 'Adam'.*AdamW, AdamW8bit, Lion, SGD, Adafactor, Prodigy"):
        optim.build_optimizer("Adam", [{"params": _model()}], 1e-3)
    with pytest.raises(ValueError, match="Lion does not accept bogus, eps"):
        _build("Lion", _model(), extra={"eps": 1e-8, "bogus": 1})
    with pytest.raises(ValueError, match="AdamW: pass lr as build_optimizer's own argument"):
        _build("AdamW", _model(), extra={"lr": 1.0})
    with pytest.raises(ValueError, match="SGD does not take betas"):
        _build("SGD", _model(), betas=(0.9, 0.99))
    plus = optim.lora_plus_groups([("w.lora_up", _model()[0]), ("w.lora_down", _model()[1])], 1.0, 4, 0.0)
    with pytest.raises(ValueError, match="Prodigy .* same lr: turn LoRA\\+ off"):
        optim.build_optimizer("Prodigy", plus, 1.0)


def test_missing_bitsandbytes_and_prodigyopt_raise_install_hints(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(RuntimeError, match="pip install bitsandbytes.*choose the AdamW optimizer"):
        _build("AdamW8bit", _model())
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    _missing_prodigy_error("Prodigy")


def test_lora_plus_puts_the_zero_initialised_side_in_a_faster_group():
    names = ["a.lora_down.weight", "a.lora_up.weight", "b.lora_A.weight", "b.lora_B.weight", "c.hada_w1_a",
             "c.hada_w1_b", "c.hada_w2_a", "c.hada_w2_b", "d.lokr_w1", "d.lokr_w2_a", "d.lokr_w2_b"]
    named = [(n, torch.nn.Parameter(torch.zeros(2))) for n in names]
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    groups = optim.lora_plus_groups([*named, ("e.lora_up", frozen)], 1e-4, 16, 0.01)
    assert [g["lr"] for g in groups] == [1e-4, 1e-4 * 16]
    assert all(g["weight_decay"] == 0.01 for g in groups)
    fast = {id(p) for p in groups[1]["params"]}
    assert [n for n, p in named if id(p) in fast] == ["a.lora_up.weight", "b.lora_B.weight", "c.hada_w1_a",
                                                       "c.hada_w2_a", "d.lokr_w1"]
    assert len(groups[0]["params"]) == 6
    for ratio in (0, 1):
        (single,) = optim.lora_plus_groups(named, 1e-4, ratio, 0.0)
        assert single["lr"] == 1e-4 and len(single["params"]) == len(named)
    with pytest.raises(ValueError, match="ratio"):
        optim.lora_plus_groups(named, 1e-4, -1, 0.0)


def test_schedulers_scale_each_lora_plus_group_from_its_own_lr():
    named = [("x.lora_down", torch.nn.Parameter(torch.zeros(2))), ("x.lora_up", torch.nn.Parameter(torch.zeros(2)))]
    opt = optim.build_optimizer("AdamW", optim.lora_plus_groups(named, 0.1, 4, 0.0), 0.1)
    sched = optim.build_scheduler("linear", opt, total_steps=10, warmup_steps=2)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.4]
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.05, 0.2])


def _curve(name: str, total: int = 100, warmup: int = 10, steps: int | None = None, **kw) -> list[float]:
    """The multiplier of the base lr that each step trains with."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = optim.build_scheduler(name, opt, total, warmup, **kw)
    lrs = []
    for _ in range((total + 1) if steps is None else steps):
        lrs.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return lrs


def test_constant_ignores_warmup_and_constant_with_warmup_ramps():
    assert set(_curve("constant")) == {1.0}
    ramp = _curve("constant_with_warmup")
    assert ramp[0] == 0.0 and ramp[5] == pytest.approx(0.5) and ramp[10] == 1.0 and set(ramp[10:]) == {1.0}


@pytest.mark.parametrize("name, mid", [("linear", 0.5), ("cosine", 0.5), ("polynomial", 0.5)])
def test_decays_warm_up_then_fall_to_the_floor(name, mid):
    lrs = _curve(name)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == 1.0
    assert lrs[55] == pytest.approx(mid) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    floored = _curve(name, min_lr_ratio=0.1, steps=151)
    assert floored[55] == pytest.approx(0.1 + 0.9 * mid) and floored[100:] == pytest.approx([0.1] * 51)


def test_cosine_is_a_half_cosine_and_polynomial_follows_power():
    assert _curve("cosine", warmup=0)[25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert _curve("polynomial", warmup=0, power=2.0)[50] == pytest.approx(0.25)


def test_cosine_with_restarts_restarts_num_cycles_times():
    lrs = _curve("cosine_with_restarts", num_cycles=3)
    assert lrs[10] == lrs[40] == lrs[70] == 1.0  # a cycle is (100 - 10) / 3 = 30 steps
    assert lrs[25] == pytest.approx(0.5) and lrs[39] < 0.01 and lrs[100] == 0.0
    restarts = sum(b > a for a, b in pairwise(lrs[10:]))
    assert restarts == 2
    floored = _curve("cosine_with_restarts", num_cycles=3, min_lr_ratio=0.2)
    assert min(floored[10:]) == pytest.approx(0.2) and floored[40] == 1.0


def test_schedules_match_transformers():
    from transformers import optimization as hf

    def reference(factory, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = factory(opt, num_warmup_steps=10, num_training_steps=100, **kw)
        return [f(step) for f in sched.lr_lambdas for step in range(101)]

    assert _curve("linear") == pytest.approx(reference(hf.get_linear_schedule_with_warmup))
    assert _curve("cosine") == pytest.approx(reference(hf.get_cosine_schedule_with_warmup))
    restarts = reference(hf.get_cosine_with_hard_restarts_schedule_with_warmup, num_cycles=3)
    assert _curve("cosine_with_restarts", num_cycles=3) == pytest.approx(restarts)
    assert _curve("polynomial", power=2.0) == pytest.approx(
        reference(hf.get_polynomial_decay_schedule_with_warmup, power=2.0, lr_end=0.0), abs=1e-12)


def test_scheduler_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="unknown scheduler 'step'.*constant, constant_with_warmup, linear"):
        optim.build_scheduler("step", opt, 10)
    with pytest.raises(ValueError, match="invalid schedule"):
        optim.build_scheduler("linear", opt, 0)


def test_scheduler_state_round_trips_through_json():
    def build():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, optim.build_scheduler("cosine_with_restarts", opt, 100, 10, num_cycles=2)

    opt, sched = build()
    for _ in range(37):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = build()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(saved)
    assert sched2.last_epoch == 37 and sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(20):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _resumable(name: str, seed: int = 0):
    """A model, its optimizer over two LoRA+ groups, and a warmup + cosine schedule."""
    weight, bias = _model(seed)
    ratio = 1.0 if name == "Prodigy" else 2.0  # Prodigy takes a single lr
    groups = optim.lora_plus_groups([("w.lora_up", weight), ("b.lora_down", bias)], LR[name], ratio, 0.01)
    opt = optim.build_optimizer(name, groups, LR[name], 0.01)
    return [weight, bias], opt, optim.build_scheduler("cosine", opt, total_steps=12, warmup_steps=3)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_resume_from_safetensors_is_bitwise_exact(name, tmp_path):
    if name == "Prodigy" and not HAS_PRODIGY:
        return _missing_prodigy_error(name)
    steps = 5
    straight, opt, sched = _resumable(name)
    _train(opt, straight, 2 * steps, sched)

    first, opt_a, sched_a = _resumable(name)
    _train(opt_a, first, steps, sched_a)
    tensors, meta = optim.optimizer_state_to_tensors(opt_a)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    (tmp_path / "state.json").write_text(json.dumps({"optimizer": meta, "scheduler": sched_a.state_dict()}))

    resumed, opt_b, sched_b = _resumable(name, seed=1)  # different weights: all of it must come from the files
    with torch.no_grad():
        for p, q in zip(resumed, first, strict=True):
            p.copy_(q)
    saved = json.loads((tmp_path / "state.json").read_text())
    optim.optimizer_state_from_tensors(opt_b, load_file(tmp_path / "optimizer.safetensors"), saved["optimizer"])
    sched_b.load_state_dict(saved["scheduler"])
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    _train(opt_a, first, steps, sched_a)
    _train(opt_b, resumed, steps, sched_b)
    for s, a, b in zip(straight, first, resumed, strict=True):
        assert torch.equal(s, a) and torch.equal(s, b)


def test_state_tensors_are_named_by_parameter_and_meta_keeps_types():
    params = _model()
    opt = _build("AdamW8bit", params, betas=(0.9, 0.99))
    _train(opt, params, 1)
    tensors, meta = optim.optimizer_state_to_tensors(opt)
    quant = "__bnb_optimizer_quant_state__"
    assert {f"state.0.{quant}.state1", f"state.1.{quant}.state2"} <= set(tensors)
    restored_meta = json.loads(json.dumps(meta))
    fresh_params = _model()
    fresh = _build("AdamW8bit", fresh_params)
    optim.optimizer_state_from_tensors(fresh, tensors, restored_meta)
    assert fresh.param_groups[0]["betas"] == (0.9, 0.99) and fresh.state[fresh_params[0]]["step"] == 1
    with pytest.raises(ValueError, match="saved from AdamW8bit, not AdamW"):
        optim.optimizer_state_from_tensors(_build("AdamW", _model()), tensors, restored_meta)
    with pytest.raises(KeyError, match="state.0"):
        optim.optimizer_state_from_tensors(fresh, {}, restored_meta)

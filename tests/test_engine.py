"""train_one_epoch / evaluate on a small deterministic model (no dropout, no mixup): gradient
accumulation, DDP equivalence, the EMA against its closed form, the loss scaler, the random
draws of each micro-batch and rank, non-finite losses and stop requests."""
import copy
import math
import os
import random
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, TensorDataset

import engine
from engine import NonFiniteBudget, NonFiniteLossError, evaluate, train_one_epoch
from losses import DistillationLoss

CRITERION = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def run(model, x, y, batch, accum, lr=0.5, epoch=0, clip_grad=None, criterion=CRITERION,
        **kwargs):
    args = SimpleNamespace(accum_iter=accum, seed=0, print_freq=100, batch_size=batch,
                           clip_grad=clip_grad, train_mode=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    return train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch, args,
                           **kwargs)


def stepped_weights(x, y, groups, lr=0.5):
    """The weights after each optimizer step of plain SGD on the mean loss of each group of
    samples ``(lo, hi)``, computed here without the engine."""
    model = toy_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    weights = [[p.detach().clone() for p in model.parameters()]]
    for lo, hi in groups:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()
        optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    return weights


def assert_same_params(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol), name


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b():
    x, y = data(8)
    accumulated, single = toy_model(), toy_model()
    stats, _ = run(accumulated, x, y, batch=2, accum=4)
    run(single, x, y, batch=8, accum=1)
    assert_same_params(accumulated, single)
    # The reported loss is the mean micro-batch loss, all four taken at the initial weights.
    with torch.no_grad():
        initial_loss = torch.nn.functional.cross_entropy(toy_model()(x), y).item()
    assert stats["loss"] == pytest.approx(initial_loss, rel=1e-6)
    assert not torch.allclose(single[0].weight, toy_model()[0].weight)


def test_a_short_last_group_steps_on_its_own_mean():
    x, y = data(6)
    accumulated, reference = toy_model(), toy_model()
    run(accumulated, x, y, batch=1, accum=4)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for lo, hi in ((0, 4), (4, 6)):
        optimizer.zero_grad()
        CRITERION(x[lo:hi], reference(x[lo:hi]), y[lo:hi]).backward()
        optimizer.step()
    assert_same_params(accumulated, reference)


def ema_closed_form(weights, decay):
    """e_0 = w_0, e_k = decay * e_{k-1} + (1 - decay) * w_k, summed out:
    e_k = decay^k w_0 + sum_j (1 - decay) decay^(k-j) w_j."""
    k = len(weights) - 1
    return [decay ** k * w0 + sum((1 - decay) * decay ** (k - j) * weights[j][i]
                                  for j in range(1, k + 1))
            for i, w0 in enumerate(weights[0])]


def test_ema_weights_are_the_closed_form_of_the_weights_after_each_optimizer_step():
    x, y = data(8)
    model = toy_model()
    ema = ModelEmaV3(model, decay=0.75)
    run(model, x, y, batch=1, accum=3, model_ema=ema)  # steps after samples 3, 6 and 8
    weights = stepped_weights(x, y, [(0, 3), (3, 6), (6, 8)])
    for got, want in zip(ema.module.parameters(), ema_closed_form(weights, 0.75)):
        torch.testing.assert_close(got, want)
    for got, want in zip(model.parameters(), weights[-1]):
        torch.testing.assert_close(got, want)


def test_a_skipped_optimizer_step_leaves_the_ema_alone():
    x, y = data(8)
    model = toy_model()
    ema = ModelEmaV3(model, decay=0.75)
    # Micro-batch 4 (second group) is non-finite: that group neither steps nor moves the EMA.
    run(model, x, y, batch=1, accum=3, model_ema=ema, criterion=NanAt({4}),
        nonfinite=NonFiniteBudget(limit=1))
    weights = stepped_weights(x, y, [(0, 3), (6, 8)])
    for got, want in zip(ema.module.parameters(), ema_closed_form(weights, 0.75)):
        torch.testing.assert_close(got, want)


def test_a_loss_scaler_changes_nothing_but_the_scale():
    """Scaled gradients are unscaled before clipping and stepping; the scale grows once per
    optimizer step (growth_interval 1), not per micro-batch."""
    x, y = data(8)
    scaled, plain = toy_model(), toy_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    run(scaled, x, y, batch=1, accum=3, clip_grad=0.05, scaler=scaler)
    run(plain, x, y, batch=1, accum=3, clip_grad=0.05)
    assert_same_params(scaled, plain)
    assert not torch.allclose(plain[0].weight, toy_model()[0].weight)
    assert scaler.get_scale() == 2.0 ** 13


def test_gradients_are_clipped_to_clip_grad_in_total_norm():
    x, y = data(8)
    model = toy_model()
    run(model, x, y, batch=4, accum=2, clip_grad=0.05)  # one step on the mean of 8
    reference = toy_model()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 0.05
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p -= 0.5 * g * 0.05 / norm
    assert_same_params(model, reference)


class DrawProbe:
    """Stands in for mixup: records one draw of each generator (python, numpy, torch) per
    micro-batch, the generators that mixup, drop path and dropout use."""

    def __init__(self):
        self.draws = []

    def __call__(self, samples, targets):
        self.draws.append((random.random(), float(np.random.rand()), torch.rand(()).item()))
        return samples, targets


def draws(epoch=0, rank=0, start=0, monkeypatch=None):
    x, y = data(8)
    probe = DrawProbe()
    monkeypatch.setattr(engine.utils, "get_rank", lambda: rank)
    args = SimpleNamespace(accum_iter=2, seed=0, print_freq=100, batch_size=1, clip_grad=None,
                           train_mode=True)
    model = toy_model()
    loader = DataLoader(TensorDataset(x[start:], y[start:]), batch_size=1)
    train_one_epoch(model, CRITERION, loader, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device("cpu"), epoch, args, mixup_fn=probe, start_step=start)
    return probe.draws


def test_each_micro_batch_epoch_and_rank_draws_its_own_randomness(monkeypatch):
    first = draws(monkeypatch=monkeypatch)
    assert len(first) == 8
    for generator in range(3):
        assert len({d[generator] for d in first}) == 8  # no two micro-batches alike
    for other in (draws(epoch=1, monkeypatch=monkeypatch),
                  draws(rank=1, monkeypatch=monkeypatch)):
        assert all(a[g] != b[g] for a, b in zip(first, other) for g in range(3))


def test_a_resumed_epoch_replays_the_same_draws(monkeypatch):
    full = draws(epoch=3, rank=1, monkeypatch=monkeypatch)
    assert draws(epoch=3, rank=1, start=5, monkeypatch=monkeypatch) == full[5:]


class NanAt(torch.nn.Module):
    """The criterion, but non-finite at the given micro-batches."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.calls = steps, 0

    def forward(self, samples, outputs, targets):
        loss = CRITERION(samples, outputs, targets)
        self.calls += 1
        return loss * math.nan if self.calls - 1 in self.steps else loss


class ModeProbe(torch.nn.Linear):
    """Records whether each forward ran in training mode (drop path and dropout on)."""

    def __init__(self):
        super().__init__(6, 3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return super().forward(x)


@pytest.mark.parametrize("train_mode", [True, False])
def test_training_runs_in_train_mode_unless_no_train_mode(train_mode):
    model = ModeProbe()
    model.eval()
    args = SimpleNamespace(accum_iter=1, seed=0, print_freq=100, batch_size=4, clip_grad=None,
                           train_mode=train_mode)
    loader = DataLoader(TensorDataset(*data(8)), batch_size=4)
    train_one_epoch(model, CRITERION, loader, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device("cpu"), 0, args)
    assert model.modes == [train_mode, train_mode]


def test_non_finite_loss_stops_with_epoch_and_step():
    model = toy_model()
    before = copy.deepcopy(model)
    args = SimpleNamespace(accum_iter=1, seed=0, print_freq=100, batch_size=2, clip_grad=None,
                           train_mode=True)
    loader = DataLoader(TensorDataset(*data(8)), batch_size=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 7, step 0"):
        train_one_epoch(model, NanAt({0}), loader, torch.optim.SGD(model.parameters(), lr=0.5),
                        torch.device("cpu"), 7, args)
    assert_same_params(model, before, atol=0)


def test_skip_nonfinite_skips_the_whole_accumulation_group():
    x, y = data(8)
    skipped, reference = toy_model(), toy_model()
    budget = NonFiniteBudget(limit=1)
    args = SimpleNamespace(accum_iter=2, seed=0, print_freq=100, batch_size=2, clip_grad=None,
                           train_mode=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    train_one_epoch(skipped, NanAt({1}), loader, torch.optim.SGD(skipped.parameters(), lr=0.5),
                    torch.device("cpu"), 0, args, nonfinite=budget)
    assert budget.used == 1
    run(reference, x[4:], y[4:], batch=2, accum=2)  # only the second group stepped
    assert_same_params(skipped, reference)


def test_stop_request_ends_the_epoch_after_the_current_optimizer_step():
    stop = SimpleNamespace(requested=True)
    stats, next_step = run(toy_model(), *data(8), batch=1, accum=3, stop=stop)
    assert next_step == 3 and "loss" in stats


def test_evaluate_reports_top1_top5_and_loss():
    # 10 classes, so that top-5 is not trivially 100%; batches of 3 leave a short last batch.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 10, (40,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10)
    stats = evaluate(DataLoader(TensorDataset(x, y), batch_size=3), model, torch.device("cpu"))
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    acc1 = 100.0 * (logits.argmax(1) == y).float().mean().item()
    acc5 = 100.0 * (top5 == y[:, None]).any(1).float().mean().item()
    assert 0 < acc1 < acc5 < 100
    assert stats["acc1"] == pytest.approx(acc1) and stats["acc5"] == pytest.approx(acc5)
    assert stats["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, y = data(8)
    # Rank r holds samples 2r, 2r+1 of every 4: each optimizer step covers the same 4 samples
    # as one batch of 4 in a single process.
    mine = torch.tensor([i for i in range(8) if (i // 2) % 2 == rank])
    model = torch.nn.parallel.DistributedDataParallel(toy_model())
    run(model, x[mine[:2]], y[mine[:2]], batch=2, accum=1)
    torch.save(model.module.state_dict(), os.path.join(out, f"plain{rank}.pt"))
    model = torch.nn.parallel.DistributedDataParallel(toy_model())
    run(model, x[mine], y[mine], batch=1, accum=2)  # 2 micro-batches of 1 on each rank
    torch.save(model.module.state_dict(), os.path.join(out, f"accum{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_of_batch_b_equal_one_process_of_2b(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    x, y = data(8)
    single = toy_model()
    run(single, x[:4], y[:4], batch=4, accum=1)
    for rank in range(2):
        ddp = toy_model()
        ddp.load_state_dict(torch.load(tmp_path / f"plain{rank}.pt"))
        assert_same_params(ddp, single)
    # With accumulation (no_sync on the first micro-batch of each group): 2 ranks x 2
    # micro-batches of 1 per step, two steps.
    single = toy_model()
    run(single, x, y, batch=4, accum=1)
    for rank in range(2):
        ddp = toy_model()
        ddp.load_state_dict(torch.load(tmp_path / f"accum{rank}.pt"))
        assert_same_params(ddp, single)

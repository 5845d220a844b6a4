"""train_one_epoch / evaluate on a small deterministic model (no dropout, no mixup): gradient
accumulation, DDP equivalence, EMA updates, non-finite losses and stop requests."""
import copy
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from engine import NonFiniteBudget, NonFiniteLossError, evaluate, train_one_epoch
from losses import DistillationLoss

CRITERION = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def run(model, x, y, batch, accum, lr=0.5, **kwargs):
    args = SimpleNamespace(accum_iter=accum, seed=0, print_freq=100, batch_size=batch,
                           clip_grad=None, train_mode=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    return train_one_epoch(model, CRITERION, loader, optimizer, torch.device("cpu"), 0, args,
                           **kwargs)


def assert_same_params(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol), name


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b():
    x, y = data(8)
    accumulated, single = toy_model(), toy_model()
    run(accumulated, x, y, batch=2, accum=4)
    run(single, x, y, batch=8, accum=1)
    assert_same_params(accumulated, single)
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


class CountingEma:
    def __init__(self):
        self.updates = 0

    def update(self, model):
        self.updates += 1


def test_ema_is_updated_once_per_optimizer_step():
    ema = CountingEma()
    run(toy_model(), *data(8), batch=1, accum=3, model_ema=ema)
    assert ema.updates == 3


class NanAt(torch.nn.Module):
    """The criterion, but non-finite at the given micro-batches."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.calls = steps, 0

    def forward(self, samples, outputs, targets):
        loss = CRITERION(samples, outputs, targets)
        self.calls += 1
        return loss * math.nan if self.calls - 1 in self.steps else loss


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
    x, y = data(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    stats = evaluate(loader, toy_model(), torch.device("cpu"))
    predicted = toy_model()(x).argmax(1)
    assert stats["acc1"] == pytest.approx(100.0 * (predicted == y).float().mean().item())
    assert stats["acc5"] == 100.0 and stats["loss"] > 0


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

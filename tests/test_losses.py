"""losses.py branch by branch against the formulas written out here (DeiT's distillation with a
non-default alpha and tau, binary cross-entropy on mixed targets), and the teacher's loading."""
from types import SimpleNamespace

import pytest
import timm
import torch

from losses import BinaryCrossEntropy, DistillationLoss, build_criterion, build_teacher
from utils import UserError

ALPHA, TAU = 0.3, 2.0


def logits(seed, shape=(4, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Teacher(torch.nn.Module):
    """Logits that are a fixed function of the inputs, so a test knows what it sees."""

    def forward(self, inputs):
        return inputs * 3.0 - 1.0


def ce(outputs, labels):
    return -torch.log_softmax(outputs, 1)[torch.arange(len(labels)), labels].mean()


def soft_kd(student, teacher, tau):
    """KL(teacher || student) at temperature tau, summed, times tau^2, over the logit count."""
    p_t = torch.softmax(teacher / tau, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / tau, 1))).sum()
    return kl * tau ** 2 / student.numel()


def test_no_distillation_is_the_base_criterion_whatever_alpha():
    outputs, labels = logits(0), torch.tensor([0, 4, 2, 2])
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", ALPHA, TAU)
    assert loss(None, outputs, labels).item() == pytest.approx(ce(outputs, labels).item(),
                                                               rel=1e-6)


def test_soft_distillation_weighs_base_by_one_minus_alpha_and_kd_by_alpha():
    inputs, outputs, labels = logits(1), logits(2), torch.tensor([1, 0, 3, 4])
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(), "soft", ALPHA, TAU)
    want = (1 - ALPHA) * ce(outputs, labels) + ALPHA * soft_kd(outputs, Teacher()(inputs), TAU)
    assert loss(inputs, outputs, labels).item() == pytest.approx(want.item(), rel=1e-5)


def test_hard_distillation_uses_the_teachers_argmax_as_label():
    inputs, outputs, labels = logits(3), logits(4), torch.tensor([1, 0, 3, 4])
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(), "hard", ALPHA, TAU)
    teacher_labels = (inputs * 3.0 - 1.0).argmax(1)
    assert not torch.equal(teacher_labels, labels)
    want = (1 - ALPHA) * ce(outputs, labels) + ALPHA * ce(outputs, teacher_labels)
    assert loss(inputs, outputs, labels).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_distillation_token_output_feeds_the_kd_term_only(kind):
    inputs, cls_out, dist_out = logits(5), logits(6), logits(7)
    labels = torch.tensor([2, 2, 0, 1])
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(), kind, ALPHA, TAU)
    kd = (soft_kd(dist_out, Teacher()(inputs), TAU) if kind == "soft" else
          ce(dist_out, Teacher()(inputs).argmax(1)))
    want = (1 - ALPHA) * ce(cls_out, labels) + ALPHA * kd
    assert loss(inputs, (cls_out, dist_out), labels).item() == pytest.approx(want.item(),
                                                                             rel=1e-5)


def bce(outputs, binary):
    p = torch.sigmoid(outputs)
    return -(binary * torch.log(p) + (1 - binary) * torch.log(1 - p)).mean()


def test_binary_cross_entropy_counts_every_mixed_in_class_as_present():
    outputs = logits(8)
    labels = torch.tensor([0, 4, 2, 2])
    binary = torch.eye(5)[labels]
    assert BinaryCrossEntropy()(outputs, labels).item() == pytest.approx(
        bce(outputs, binary).item(), rel=1e-5)
    mixed = 0.7 * binary + 0.3 * torch.eye(5)[labels.flip(0)]
    present = binary + torch.eye(5)[labels.flip(0)] - binary * torch.eye(5)[labels.flip(0)]
    assert BinaryCrossEntropy()(outputs, mixed).item() == pytest.approx(
        bce(outputs, present).item(), rel=1e-5)


def criterion_args(**kw):
    return SimpleNamespace(**{"bce_loss": False, "smoothing": 0.0, "distillation_type": "soft",
                              "distillation_alpha": ALPHA, "distillation_tau": TAU, **kw})


def test_build_criterion_passes_alpha_and_tau_through():
    inputs, outputs = logits(9), logits(10)
    labels = torch.tensor([3, 1, 0, 0])
    criterion = build_criterion(criterion_args(), mixup_active=False, teacher=Teacher())
    want = (1 - ALPHA) * ce(outputs, labels) + ALPHA * soft_kd(outputs, Teacher()(inputs), TAU)
    assert criterion(inputs, outputs, labels).item() == pytest.approx(want.item(), rel=1e-5)
    # Under mixup the base term is soft-target cross-entropy.
    targets = torch.softmax(logits(11), 1)
    criterion = build_criterion(criterion_args(smoothing=0.1), mixup_active=True,
                                teacher=Teacher())
    soft = (-(targets * torch.log_softmax(outputs, 1)).sum(1)).mean()
    want = (1 - ALPHA) * soft + ALPHA * soft_kd(outputs, Teacher()(inputs), TAU)
    assert criterion(inputs, outputs, targets).item() == pytest.approx(want.item(), rel=1e-5)


def test_the_teacher_is_loaded_frozen_from_its_checkpoint(tmp_path):
    source = timm.create_model("resnet10t", num_classes=7)
    path = tmp_path / "teacher.pth"
    torch.save({"model": source.state_dict()}, path)
    args = SimpleNamespace(teacher_model="resnet10t", teacher_path=str(path),
                           distillation_type="hard")
    teacher = build_teacher(args, 7, torch.device("cpu"))
    assert not teacher.training
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key


@pytest.mark.parametrize("model, path, message", [
    ("resnet10t", "", "--distillation-type soft needs --teacher-path"),
    ("no_such_net", "t.pth", "unknown --teacher-model 'no_such_net'")])
def test_teacher_errors_name_the_flag(model, path, message):
    args = SimpleNamespace(teacher_model=model, teacher_path=path, distillation_type="soft")
    with pytest.raises(UserError, match=message):
        build_teacher(args, 7, torch.device("cpu"))

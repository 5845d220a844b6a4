"""Training criteria, as DeiT builds them: cross-entropy (plain or label-smoothed),
soft-target cross-entropy for mixup/cutmix targets, binary cross-entropy (DeiT III), and
knowledge distillation from a timm teacher wrapped around whichever of them is used."""
import timm
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from checkpoints import check_fit, load_checkpoint, model_state_dict
from utils import UserError


class BinaryCrossEntropy(torch.nn.Module):
    """BCE with every class present in the (possibly mixed) target set to 1, as DeiT III
    binarises mixup targets (``targets.gt(0.0)``)."""

    def forward(self, outputs, targets):
        if targets.ndim == 1:
            targets = F.one_hot(targets, outputs.shape[-1])
        return F.binary_cross_entropy_with_logits(outputs, targets.gt(0.0).to(outputs.dtype))


class DistillationLoss(torch.nn.Module):
    """DeiT's distillation loss: ``(1 - alpha) * base + alpha * distillation`` where the
    distillation term is a KL divergence at temperature ``tau`` (soft) or cross-entropy with
    the teacher's argmax (hard). A model with a distillation token returns (class, dist)
    outputs; a single-output model (Mamba®) is distilled through its one head."""

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = outputs
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_teacher(args, num_classes, device):
    """The frozen timm teacher for --distillation-type soft/hard, weights from --teacher-path."""
    if not args.teacher_path:
        raise UserError(f"--distillation-type {args.distillation_type} needs --teacher-path "
                        f"(weights of the {args.teacher_model} teacher)")
    if not timm.is_model(args.teacher_model):
        raise UserError(f"unknown --teacher-model {args.teacher_model!r} (not a timm model)")
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    state_dict = model_state_dict(load_checkpoint(args.teacher_path, "teacher checkpoint"),
                                  args.teacher_path)
    check_fit(teacher, state_dict, args.teacher_path, args.teacher_model)
    teacher.load_state_dict(state_dict)
    return teacher.to(device).eval()


def build_criterion(args, mixup_active, teacher=None):
    if args.bce_loss:
        base = BinaryCrossEntropy()
    elif mixup_active:
        # Label smoothing is then applied by Mixup to the targets.
        base = SoftTargetCrossEntropy()
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha,
                            args.distillation_tau)

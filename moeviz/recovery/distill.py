"""Recovery of a compressed model by expert-wise knowledge distillation from the base model.

    student = a fresh compressed copy (Compressor.apply with the pruning masks)
    teacher = the loaded base model itself, run without gradients (never modified, never copied)
    loss    = CE + λ_expert · Σ expert-output MSE + λ_router · Σ router KL   (see losses.py)

The student's expert tensors (and routers, if trained) are cloned away from the base and
re-parametrised so that masks, removed experts and quantization grids hold at every step
(constraints.py). The student's experts runtime gets an observer (moeviz.models.runtime) that hands
each expert's output to the expert term; the teacher's same expert is evaluated on the same inputs.
Both models stay in eval mode: routers such as PhiMoE's switch to a stochastic rule in train mode,
and recovery must train the routing the compressed model will use.

Memory: base + the student's cloned expert tensors (+ routers) + AdamW state and gradients of those
tensors; activations of one batch. No second copy of the base.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.nn.utils import parametrize

from moeviz.compression.apply import CompressedModel, Compressor
from moeviz.compression.plan import CompressionPlan
from moeviz.data import TokenSamples
from moeviz.errors import PlanError
from moeviz.models.experts import expert_output, gate_on_input
from moeviz.models.layers import MoELayer, find_moe_layers
from moeviz.models.runtime import install_experts_runtime
from moeviz.models.views import structural_copy
from moeviz.recovery.constraints import make_trainable, release
from moeviz.recovery.losses import balanced_lambda, expert_mse, next_token_cross_entropy, router_kl

TRAINABLE = ("experts", "experts+router")


class RecoveryError(PlanError):
    """Recovery settings or inputs are invalid; the message names the setting."""


@dataclass
class RecoverySettings:
    steps: int = 100
    learning_rate: float = 3e-4
    batch_size: int = 4  # windows of the calibration samples per step
    lambda_expert: float | None = None  # None: balanced at the first step so λ·MSE₀ = CE₀
    lambda_router: float | None = None  # None: balanced at the first step so λ·KL₀ = CE₀; 0 skips the teacher pass
    train: str = "experts"  # "experts" or "experts+router"
    max_seconds: float | None = None  # wall-clock budget; training stops early and the result is kept
    seed: int = 0

    def validate(self) -> "RecoverySettings":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise RecoveryError(f"recovery.steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise RecoveryError(f"recovery.learning_rate must lie in (0, 1), got {self.learning_rate!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RecoveryError(f"recovery.batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("lambda_expert", "lambda_router"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise RecoveryError(f"recovery.{name} must be a number >= 0 or None (balanced), got {v!r}")
        if self.train not in TRAINABLE:
            raise RecoveryError(f"recovery.train must be one of {TRAINABLE}, got {self.train!r}")
        if self.max_seconds is not None and not (self.max_seconds > 0):
            raise RecoveryError(f"recovery.max_seconds must be > 0 or None, got {self.max_seconds!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryResult:
    """What recovery did: settings, the λs used, the three loss terms per step."""

    settings: dict
    lambda_expert: float
    lambda_router: float
    history: list[dict]  # per step: step, ce, expert_mse, router_kl, loss, seconds (since start)
    steps_done: int
    stopped_early: str | None  # None, "cancelled" or "time budget"
    seconds: float
    trained_parameters: int
    trained_bytes: int  # the student's own copies of the trained tensors (AdamW adds 2× this, gradients 1×)
    tokens_seen: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The run-store view: settings, λs, first and last losses, no per-step history."""
        first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
        return dict(settings=self.settings, lambda_expert=self.lambda_expert, lambda_router=self.lambda_router,
                    steps_done=self.steps_done, stopped_early=self.stopped_early, seconds=self.seconds,
                    trained_parameters=self.trained_parameters, tokens_seen=self.tokens_seen,
                    first=first, last=last)


class _RouterTap:
    """Forward hook keeping a router's logits [T, E] (with their graph, for the student)."""

    def __init__(self, layer: MoELayer, detach: bool):
        self.layer, self.detach, self.logits = layer, detach, None
        self.handle = layer.router.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.layer.distribution == "selected":
            return  # unverified routing rule: no full distribution to distil
        logits = output[self.layer.adapter.logits_slot] if isinstance(output, tuple) else output
        logits = logits.reshape(-1, self.layer.num_experts)
        self.logits = logits.detach() if self.detach else logits


class _ExpertDistiller:
    """Observers on a student experts runtime: each expert's output is compared to the teacher's same
    expert on the same inputs while the reference loop computes it."""

    def __init__(self, student: MoELayer, teacher: MoELayer):
        self.student, self.teacher = student, teacher
        self.runtime = install_experts_runtime(student)
        self.saved_transform = self.runtime.input_transform  # e.g. activation fake-quant
        if self.saved_transform is not None:  # straight-through, so gradients reach earlier layers
            t = self.saved_transform
            self.runtime.input_transform = lambda e, x: x + (t(e, x) - x).detach()  # noqa: E731
        self.hidden: torch.Tensor | None = None
        self.terms: list[torch.Tensor] = []
        self.runtime.routing_observers.append(self.see_routing)
        self.runtime.observers.append(self.observe)

    def see_routing(self, hidden_states, top_k_index, top_k_weights):
        self.hidden = hidden_states

    def observe(self, e, token_idx, gate, x, h, y):
        with torch.no_grad():
            x_teacher = self.hidden[token_idx].detach()
            if gate_on_input(self.teacher.experts):  # Llama 4 scales the expert's input by its weight
                x_teacher = x_teacher * gate.detach()[:, None].to(x_teacher.dtype)
            _, y_teacher = expert_output(self.teacher.experts, e, x_teacher)
        self.terms.append(expert_mse(y, y_teacher))

    def take(self) -> torch.Tensor:
        # A layer whose experts saw no token this batch contributes a zero on the model's device
        # (a CPU zero would not stack with CUDA terms of the other layers).
        device = self.student.router_weight.device
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros((), device=device)
        self.terms = []
        self.hidden = None
        return total

    def restore(self) -> None:
        self.runtime.routing_observers.remove(self.see_routing)
        self.runtime.observers.remove(self.observe)
        self.runtime.input_transform = self.saved_transform


def _batches(samples: TokenSamples, batch_size: int, seed: int):
    """Endless seeded shuffles of the sample windows, `batch_size` at a time ([B, S] each)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(samples.n_samples, generator=g)
        for i in range(0, samples.n_samples - batch_size + 1, batch_size):
            yield samples.input_ids[order[i:i + batch_size]]


class DistillationSession:
    """Student (a fresh compressed copy, trainable, constrained) and teacher (hooks on a structural
    copy of the base) wired for the recovery loss. Use as a context manager: leaving it releases the
    student as an ordinary frozen compressed model and removes every hook."""

    def __init__(self, compressor: Compressor, plan: CompressionPlan, train_router: bool = False,
                 samples: TokenSamples | None = None):
        loaded = compressor.loaded
        self.student = compressor.apply(plan, samples if plan.sequential or plan.second_order() else None, keep_masks=True)
        self.student.model.eval()
        self.teacher = structural_copy(loaded.model)  # a hookable view of the base; shares every tensor
        self.teacher.eval()
        teacher_layers = find_moe_layers(self.teacher, loaded.layers)
        for layer in self.student.layers:  # runtime class first: parametrize subclasses the module's class
            install_experts_runtime(layer)
        self.params = make_trainable(self.student, loaded.model, train_router=train_router)
        self.distillers = [_ExpertDistiller(s, t) for s, t in zip(self.student.layers, teacher_layers)]
        self.student_taps = [_RouterTap(l, detach=False) for l in self.student.layers]
        self.teacher_taps = [_RouterTap(l, detach=True) for l in teacher_layers]
        self.device = next(self.student.model.parameters()).device

    def __enter__(self) -> "DistillationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def terms(self, ids: torch.Tensor, with_router: bool = True) -> dict[str, torch.Tensor]:
        """Forward of the student (with graph) and the teacher (without) on ids [B, S]:
        CE, Σ expert-output MSE, Σ router KL (zero when with_router is False: no teacher pass)."""
        ids = ids.to(self.device)
        if with_router:
            with torch.no_grad():
                self.teacher(input_ids=ids, use_cache=False)
        logits = self.student.model(input_ids=ids, use_cache=False).logits  # [B, S, V]
        ce = next_token_cross_entropy(logits, ids)
        mse = torch.stack([d.take() for d in self.distillers]).sum()
        kl = torch.zeros((), device=self.device)
        if with_router:
            for i, (s, t) in enumerate(zip(self.student_taps, self.teacher_taps)):
                if t.logits is None or s.logits is None:
                    continue
                kl = kl + router_kl(t.logits, s.logits, s.layer.adapter.distribution,
                                    self.student.allowed_experts(i))
        return dict(ce=ce, expert_mse=mse, router_kl=kl)

    def close(self) -> None:
        if self.distillers is None:
            return
        for d in self.distillers:
            d.restore()
        for tap in self.student_taps + self.teacher_taps:
            tap.handle.remove()
        release(self.student)
        self.distillers = None


def recover(
    compressor: Compressor,
    plan: CompressionPlan,
    samples: TokenSamples,
    settings: RecoverySettings | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[CompressedModel, RecoveryResult]:
    """Apply `plan` to a fresh copy of the base and fine-tune it against the base on `samples`.

    progress(step, steps, terms) after every step (terms: ce, expert_mse, router_kl, loss as floats);
    should_stop() is checked before every step. Returns the recovered compressed model (an ordinary
    `CompressedModel`, ready for `Evaluator.evaluate` and `export_model`) and what training did.
    """
    settings = (settings or RecoverySettings()).validate()
    if samples.n_samples < settings.batch_size:
        raise RecoveryError(f"recovery.batch_size {settings.batch_size} is larger than the {samples.n_samples} "
                            "training windows; lower the batch size or give more text")
    start = time.perf_counter()
    session = DistillationSession(compressor, plan, settings.train == "experts+router", samples)
    params = session.params
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    torch.manual_seed(settings.seed)

    history: list[dict] = []
    lam_e, lam_r = settings.lambda_expert, settings.lambda_router
    with_router = lam_r is None or lam_r > 0
    stopped = None
    batches = _batches(samples, settings.batch_size, settings.seed)
    with session:
        for step in range(1, settings.steps + 1):
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
            if settings.max_seconds is not None and time.perf_counter() - start > settings.max_seconds:
                stopped = "time budget"
                break
            with parametrize.cached():  # constrained weights computed once per step, not once per expert
                t = session.terms(next(batches), with_router)
                if lam_e is None:
                    lam_e = balanced_lambda(t["ce"].item(), t["expert_mse"].item())
                if lam_r is None:
                    lam_r = balanced_lambda(t["ce"].item(), t["router_kl"].item())
                loss = t["ce"] + lam_e * t["expert_mse"] + (lam_r * t["router_kl"] if with_router else 0.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            row = dict(step=step, **{k: v.item() for k, v in t.items()}, loss=loss.item(),
                       seconds=time.perf_counter() - start)
            if not math.isfinite(row["loss"]):
                raise RecoveryError(f"recovery diverged at step {step} (loss {row['loss']}); "
                                    "lower recovery.learning_rate")
            history.append(row)
            if progress is not None:
                progress(step, settings.steps, row)
    del optimizer
    student = session.student
    trained = sum(p.numel() for p in params)
    result = RecoveryResult(
        settings=settings.to_dict(), lambda_expert=float(lam_e if lam_e is not None else 0.0),
        lambda_router=float(lam_r if lam_r is not None else 0.0), history=history, steps_done=len(history),
        stopped_early=stopped, seconds=time.perf_counter() - start, trained_parameters=trained,
        trained_bytes=sum(p.numel() * p.element_size() for p in params),
        tokens_seen=len(history) * settings.batch_size * samples.seq_len,
    )
    student.recovery = result.summary()
    student.masks = {}  # only needed while training
    return student, result

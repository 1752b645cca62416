"""Evaluate a compressed model against its base on held-out text: the figures the app draws.

Every number is one of: measured by a forward pass on the held-out tokens (perplexity, accuracy,
routing, drift, CV), measured by a clock on this machine (latency, kind "measured"), computed from
documented storage formats (compression ratio), or a roofline model (latency, kind "projected").

The base model is evaluated once per (model, eval data) by `Evaluator` and reused for every plan.
One pass per model gives both the loss (from the logits) and the routing (from the same hooks that
calibration uses), so routing drift compares base and compressed routing on the same tokens.
Measured latency is the exception: a clock reading is only comparable with one taken under the same
conditions, so every evaluation times the base and the compressed model back to back (interleaved
repeats, `moeviz.latency_ab`), with the median, the quartiles and a busy-machine flag.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from moeviz.calibration.collect import calibrate
from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.apply import CompressedModel
from moeviz.compression.packed import LAZY_DENSE, timing_model
from moeviz.data import TokenSamples, check_seq_len
from moeviz.errors import SettingsError
from moeviz.evaluation.latency import (
    ACCELERATORS, active_bytes_per_token, active_flops_per_token, projected_decode_latency,
)
from moeviz.latency_ab import ab_metrics, as_measured_latency, interleaved_decode_latency
from moeviz.evaluation.metrics import TokenLossAccumulator, load_balance_cv, routing_drift, utilization_shift
from moeviz.evaluation.uncertainty import drift_windows, interval_metrics, per_token_drift, quality_intervals
from moeviz.models.loading import LoadedModel

DEFAULT_ACCELERATOR = "NVIDIA H100 SXM"
LAZY_LATENCY = LAZY_DENSE  # why a lazy model without kernels is not timed


@dataclass
class EvalSettings:
    batch_size: int = 8
    record_tokens: int = 4096  # tokens whose full routing is compared for drift
    measure_latency: bool = True
    latency_prompt_tokens: int = 64
    latency_decode_tokens: int = 16
    latency_repeats: int = 5  # interleaved base / compressed pairs: the median and quartiles of these
    accelerator: str = DEFAULT_ACCELERATOR  # for projected latency
    # Tokens per forward batch for a lazily compressed model (None: from a memory budget, see
    # `lazy_batch_size`). Each forward batch compresses every expert it reaches again, so a lazy model
    # is evaluated in as few batches as memory allows, not `batch_size` windows at a time.
    lazy_batch_tokens: int | None = None

    def validate(self) -> "EvalSettings":
        """SettingsError naming the bad field; the CLI calls it before loading the model."""
        if self.accelerator not in ACCELERATORS:
            raise SettingsError(f"accelerator: unknown {self.accelerator!r}; choose one of "
                                f"{', '.join(repr(a) for a in sorted(ACCELERATORS))}")
        for name in ("batch_size", "latency_prompt_tokens", "latency_decode_tokens", "latency_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SettingsError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.lazy_batch_tokens is not None and (not isinstance(self.lazy_batch_tokens, int)
                                                   or self.lazy_batch_tokens < 1):
            raise SettingsError(f"lazy_batch_tokens: must be a positive integer or None, got {self.lazy_batch_tokens!r}")
        return self


@dataclass
class ModelRun:
    """One model's outputs on the eval data: loss summary, routing statistics, measured latency."""

    loss: dict
    routing: CalibrationStats
    measured_latency: dict | None
    seconds: float
    latency_unavailable: str | None = None  # why measured latency is None although it was asked for
    windows: dict | None = None  # per held-out window: nll, tokens, correct (TokenLossAccumulator.windows)


@dataclass
class EvalResult:
    """Everything the app shows for one plan, next to the base model. JSON-serialisable via to_dict()."""

    plan: dict
    perplexity: float
    accuracy: float
    per_domain: dict
    base_perplexity: float
    base_accuracy: float
    base_per_domain: dict
    compression: dict  # StorageReport.summary(): ratios and bytes (formats documented in formats.py)
    drift: list[dict]  # per layer: topk_overlap, top1_change_rate, kl
    load_balance: list[dict]  # per layer: CV from top-k and top-1 counts, base and compressed
    utilization: dict  # {"base": [L][E], "compressed": [L][E], "shift": [L][E]}
    latency_measured: dict | None  # kind = "measured", this machine; None if not measured or unavailable
    base_latency_measured: dict | None
    latency_projected: dict  # kind = "projected", roofline on `accelerator`
    base_latency_projected: dict
    seconds: float
    apply_seconds: float
    eval_tokens: int
    eval_fingerprint: str
    # Why measured latency is missing although it was asked for (e.g. the model's cache cannot decode).
    latency_unavailable: str | None = None
    # Base and compressed timed back to back (`moeviz.latency_ab`): medians, quartiles, every repeat,
    # spreads_overlap, busy + busy_reason. latency_measured / base_latency_measured are its two sides.
    latency_ab: dict | None = None
    # SparseGPT / GPTQ plans: CompressedModel.second_order (seconds, threads, warnings: experts with fewer
    # routed calibration tokens than columns, whose Hessian was damped more)
    second_order: dict | None = None
    # Confidence intervals (moeviz.evaluation.uncertainty.quality_intervals: seeded bootstrap over the
    # held-out windows): {metric: {value, lo, hi}} for perplexity, accuracy, their base values, the paired
    # perplexity increase / accuracy change, the drift means; "settings" says how.
    intervals: dict | None = None
    # The per-window sums the intervals come from (base, compressed, drift, seq_len, fingerprint): two runs
    # on the same windows are compared pairwise (uncertainty.paired_differences).
    windows: dict | None = None
    # Task accuracy (moeviz.evaluation.tasks, lm-eval-harness) when asked for: {task: {acc, acc_stderr,
    # acc_norm, acc_norm_stderr, n, version, num_fewshot, seed, limit}} of the compressed and base model,
    # and the TaskSettings (+ lm_eval_version) they were run with.
    tasks: dict | None = None
    base_tasks: dict | None = None
    task_settings: dict | None = None
    # The packed low-bit model whose decode was timed (`moeviz.compression.packed.PackReport.summary()`:
    # kernels -> experts, resident bytes of the packed experts vs the storage report); None where the plan
    # quantizes no expert to a width with a kernel (the compressed model itself was timed, dense)
    packed: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict:
        """Flat numeric summary (one row of a sweep table / run store)."""
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        m = dict(
            perplexity=self.perplexity, accuracy=self.accuracy,
            base_perplexity=self.base_perplexity, base_accuracy=self.base_accuracy,
            perplexity_increase=self.perplexity / self.base_perplexity - 1,
            compression_ratio=self.compression["compression_ratio"],
            experts_compression_ratio=self.compression["experts_compression_ratio"],
            # against a bf16 checkpoint (how papers count), and the smallest format an export target holds
            compression_ratio_bf16=self.compression.get("compression_ratio_bf16"),
            export_compression_ratio=self.compression.get("export_compression_ratio"),
            parameter_bytes=self.compression["compressed_bytes"],
            projected_decode_ms=self.latency_projected["ms_per_token"],
            base_projected_decode_ms=self.base_latency_projected["ms_per_token"],
            mean_cv=mean([l["cv_topk"] for l in self.load_balance]),
            base_mean_cv=mean([l["base_cv_topk"] for l in self.load_balance]),
            mean_topk_overlap=mean([d["topk_overlap"] for d in self.drift]),
            mean_top1_change=mean([d["top1_change_rate"] for d in self.drift]),
            mean_kl=mean([d["kl"] for d in self.drift]),
            eval_seconds=self.seconds,
        )
        if self.latency_measured:
            m["measured_decode_ms"] = self.latency_measured["decode_ms_per_token"]
            m["measured_prefill_tok_s"] = self.latency_measured["prefill_tokens_per_s"]
        if self.base_latency_measured:
            m["base_measured_decode_ms"] = self.base_latency_measured["decode_ms_per_token"]
        if self.latency_ab:
            m.update(ab_metrics(self.latency_ab))
        if self.packed:
            m["packed_expert_bytes"] = self.packed["resident_bytes"]
        for name, d in self.per_domain.items():
            m[f"perplexity[{name}]"] = d["perplexity"]
            m[f"accuracy[{name}]"] = d["accuracy"]
        from moeviz.evaluation.tasks import task_metrics

        m.update(interval_metrics(self.intervals))
        m.update(task_metrics(self.tasks))
        m.update(task_metrics(self.base_tasks, prefix="base_"))
        return m


def _top1(record_topk: torch.Tensor, record_probs: torch.Tensor) -> torch.Tensor:
    """[N] the highest-probability expert among each token's chosen ones (routers may return the
    top-k unsorted, e.g. DeepSeek-V3's group routing)."""
    if record_topk.numel() == 0:
        return record_topk.new_zeros(0)
    E = record_probs.shape[1]
    # Ids >= E (zero-compute or sentinel experts) have no probability: they never count as the top-1.
    p = record_probs.gather(1, record_topk.clamp(max=E - 1)).masked_fill(record_topk >= E, -1.0)
    return record_topk.gather(1, p.argmax(1, keepdim=True)).squeeze(1)


def _latency_inputs(loaded: LoadedModel, storage_tensors: list[dict], layers_E: list[int]):
    """Per-expert stored bytes and MACs per layer, plus dense bytes / MACs read for every token."""
    L = len(layers_E)
    expert_bytes = [[0.0] * E for E in layers_E]
    expert_macs = [[0.0] * E for E in layers_E]
    router_bytes = router_macs = 0
    for t in storage_tensors:
        if t["tensor"] == "router":
            router_bytes += t["bytes"]
            router_macs += t["numel"]
        else:
            expert_bytes[t["layer"]][t["expert"]] += t["bytes"]
            if t["format"] != "removed":
                expert_macs[t["layer"]][t["expert"]] += t["numel"]
    model = loaded.model
    all_params = sum(p.numel() for p in model.parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    exp_params = sum(l.expert_param_count() * l.num_experts for l in loaded.layers)
    exp_dense_bytes = sum(l.expert_param_count() * l.num_experts * l.weight("down").element_size() for l in loaded.layers)
    rt_params = sum(l.router_weight.numel() for l in loaded.layers)
    rt_dense_bytes = sum(l.router_weight.numel() * l.router_weight.element_size() for l in loaded.layers)
    other_params = all_params - exp_params - rt_params
    other_bytes = all_bytes - exp_dense_bytes - rt_dense_bytes
    # Decoding reads one row of an (untied) input embedding table, not the whole table.
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:
        other_params -= emb.numel() - emb.shape[1]
        other_bytes -= (emb.numel() - emb.shape[1]) * emb.element_size()
    assert L == len(expert_bytes)
    return expert_bytes, expert_macs, other_bytes + router_bytes, other_params + router_macs


def _identity_storage(loaded: LoadedModel) -> list[dict]:
    """The base model's storage report tensors (the empty plan, applied lazily: storage only, no weight read)."""
    from moeviz.compression.apply import Compressor
    from moeviz.compression.plan import CompressionPlan

    return Compressor(loaded).apply(CompressionPlan(), lazy=True).storage.tensors


def back_to_back_latency(base_model, compressed: CompressedModel, prompt: torch.Tensor, decode_tokens: int,
                         repeats: int, progress=None):
    """(measurement, None, packing report or None) or (None, why not, None): the base and the compressed model's
    decode timed alternately in one loop (`latency_ab`); the compressed side on the packed low-bit runtime where
    the plan has kernels (`compression.packed.timing_model`), labelled with the runtime and kernels it ran."""
    target, packed, why = timing_model(compressed)
    if target is None:
        return None, why, None
    ab = interleaved_decode_latency(base_model, target, prompt, decode_tokens, repeats, progress=progress)
    ab["runtime"] = "packed" if packed is not None else "dense"
    ab["kernels"] = packed.kernels if packed is not None else None  # label -> experts
    return ab, None, packed


def lazy_batch_size(loaded: LoadedModel, samples: TokenSamples, settings: EvalSettings) -> int:
    """Windows per forward batch when evaluating a lazily compressed model.

    A lazy model compresses each expert a batch reaches, in every batch, and compressing an expert
    costs far more than its matmuls (every weight is scored, selected and masked), so the fewer the
    batches the better. The batch grows until its activations would take about as much memory as one
    MoE layer's expert weights (at least 1 GiB): memory stays O(one layer) on top of the model. Per
    token: logits, their log-softmax and a float copy (12 bytes x vocabulary), ~24 hidden-size float32
    activations, the routed experts' intermediate activations (3 x top-k x intermediate) and the
    attention scores (2 x heads x window, float32): an estimate, not a measurement."""
    if settings.lazy_batch_tokens is not None:
        tokens = settings.lazy_batch_tokens
    else:
        layers = loaded.layers
        layer_bytes = max((l.expert_param_count() * l.num_experts * l.weight("down").element_size() for l in layers),
                          default=0)
        config = loaded.model.config
        head = loaded.model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else int(getattr(config, "vocab_size", 0) or 32000)
        hidden = max((l.hidden_size for l in layers), default=getattr(config, "hidden_size", 1))
        routed = max((l.top_k * l.intermediate_size for l in layers), default=0)
        heads = int(getattr(config, "num_attention_heads", 32) or 32)
        per_token = 12 * vocab + 4 * 24 * hidden + 4 * 3 * routed + 4 * 2 * heads * samples.seq_len
        tokens = max(layer_bytes, 1024**3) // per_token
    return max(settings.batch_size, min(samples.n_samples, tokens // samples.seq_len))


class Evaluator:
    """Evaluates plans against one base model on one held-out token set; the base is run once.

    Shared: the app keeps one per model for every browser session, so after construction it is read-only
    (settings, samples, the base run and its projected latency are fixed there) except `base_tasks`, a cache of
    the base model's task scores keyed by TaskSettings.key() and filled under a lock (thread-safe: each
    setting's base tasks run once). Other settings mean another Evaluator."""

    def __init__(self, loaded: LoadedModel, samples: TokenSamples, settings: EvalSettings | None = None,
                 progress=None):
        self.loaded = loaded
        self.samples = samples
        self.settings = settings or EvalSettings()
        self.settings.validate()
        check_seq_len(samples.seq_len, loaded.max_context)  # before the base run, not after it
        self.base = self._run(loaded, progress)
        self.base_projected = self._projected(_identity_storage(loaded), self.base.routing)
        self._base_tasks: dict = {}  # TaskSettings.key() -> the base model's TaskResults (under _tasks_lock)
        self._tasks_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.samples.fingerprint

    def _run(self, loaded: LoadedModel, progress=None, batch_size: int | None = None) -> ModelRun:
        """Loss and routing of one model on the held-out text (latency is timed by `_latency`)."""
        start = time.perf_counter()
        acc = TokenLossAccumulator(self.samples.domain_names)
        s = self.settings
        # Routing statistics only: drift, balance and utilization need no per-expert activation norms.
        routing = calibrate(loaded, self.samples, batch_size=batch_size or s.batch_size, record_tokens=s.record_tokens,
                            expert_stats=False,
                            progress=progress, on_batch=lambda ids, dom, logits: acc.add(logits, ids, dom.tolist()))
        return ModelRun(acc.result(), routing, None, time.perf_counter() - start, windows=acc.windows)

    def base_tasks(self, tasks):
        """The base model's task scores for these TaskSettings (run once per settings, then cached)."""
        from moeviz.evaluation.tasks import evaluate_tasks

        key = tasks.key()
        with self._tasks_lock:  # two sessions asking for the same settings: the second waits, then reads
            if key not in self._base_tasks:
                self._base_tasks[key] = evaluate_tasks(self.loaded.model, self.loaded.tokenizer, tasks)
            return self._base_tasks[key]

    def _latency(self, compressed: CompressedModel) -> tuple[dict | None, str | None, dict | None]:
        """(back-to-back measurement of base and compressed, None, packing report) or (None, why it is
        unavailable, None). The compressed side runs the packed low-bit runtime (`compression.packed`) where
        the plan quantizes experts to a width with a kernel; else the compressed model itself (dense)."""
        s = self.settings
        if not s.measure_latency:
            return None, None, None
        try:
            ab, why, packed = back_to_back_latency(self.loaded.model, compressed, self.latency_prompt(),
                                                   s.latency_decode_tokens, s.latency_repeats)
        except Exception as e:  # e.g. a cache that cannot decode: only this measurement is lost
            return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", None
        return ab, why, packed.summary() if packed is not None else None

    def latency_prompt(self) -> torch.Tensor:
        """[T] the prompt every latency measurement decodes after: the first held-out window's first tokens."""
        return self.samples.input_ids[0, : self.settings.latency_prompt_tokens]

    def _projected(self, storage_tensors, routing: CalibrationStats) -> dict:
        eb, em, dense_b, dense_m = _latency_inputs(self.loaded, storage_tensors, [l.num_experts for l in self.loaded.layers])
        util = [l.utilization().tolist() for l in routing.layers]
        ks = [l.top_k for l in routing.layers]
        proj = projected_decode_latency(active_bytes_per_token(eb, ks, util, dense_b),
                                        active_flops_per_token(em, ks, util, dense_m), self.settings.accelerator)
        return asdict(proj)

    def evaluate(self, compressed: CompressedModel, progress=None, tasks=None) -> EvalResult:
        """tasks: TaskSettings (moeviz.evaluation.tasks) to also run lm-eval tasks on the compressed
        model (and, once per settings, on the base); None: none."""
        start = time.perf_counter()
        view = LoadedModel(compressed.model, self.loaded.tokenizer, compressed.layers, self.loaded.info)
        # A lazy model compresses each expert whenever a forward batch reaches it: as few batches as memory allows.
        run = self._run(view, progress, batch_size=lazy_batch_size(self.loaded, self.samples, self.settings)
                        if compressed.lazy else None)
        ab, no_latency, packed = self._latency(compressed)
        base, comp = self.base.routing, run.routing
        drift, balance, u_base, u_comp, u_shift, token_drift = [], [], [], [], [], []
        for i, (lb, lc) in enumerate(zip(base.layers, comp.layers)):
            top1 = _top1(lb.record_topk, lb.record_probs), _top1(lc.record_topk, lc.record_probs)
            d = routing_drift(lb.record_topk, lc.record_topk, lb.record_probs, lc.record_probs, *top1)
            drift.append(dict(layer=i, **asdict(d)))
            token_drift.append(per_token_drift(lb.record_topk, lc.record_topk, lb.record_probs, lc.record_probs, *top1))
            active = compressed.allowed_experts(i)
            balance.append(dict(
                layer=i,
                base_cv_topk=load_balance_cv(lb.routed_counts), base_cv_top1=load_balance_cv(lb.top1_counts),
                cv_topk=load_balance_cv(lc.routed_counts, active), cv_top1=load_balance_cv(lc.top1_counts, active),
            ))
            u_base.append(lb.utilization().tolist())
            u_comp.append(lc.utilization().tolist())
            u_shift.append(utilization_shift(lb.routed_counts, lc.routed_counts).tolist())
        windows = dict(seq_len=self.samples.seq_len, fingerprint=self.samples.fingerprint, base=self.base.windows,
                       compressed=run.windows, drift=drift_windows(token_drift, self.samples.seq_len))
        task_fields = {}
        if tasks is not None:
            from moeviz.evaluation.tasks import evaluate_tasks

            done = evaluate_tasks(compressed.model, self.loaded.tokenizer, tasks, lazy=compressed.lazy)
            task_fields = dict(tasks=done.tasks, base_tasks=self.base_tasks(tasks).tasks,
                               task_settings={**tasks.to_dict(), "lm_eval_version": done.lm_eval_version})
        return EvalResult(
            plan=compressed.plan.to_dict(),
            perplexity=run.loss["perplexity"], accuracy=run.loss["accuracy"], per_domain=run.loss["per_domain"],
            base_perplexity=self.base.loss["perplexity"], base_accuracy=self.base.loss["accuracy"],
            base_per_domain=self.base.loss["per_domain"],
            compression=compressed.storage.summary(),
            drift=drift, load_balance=balance,
            utilization=dict(base=u_base, compressed=u_comp, shift=u_shift),
            latency_measured=as_measured_latency(ab, "compressed") if ab else None,
            base_latency_measured=as_measured_latency(ab, "base") if ab else None,
            latency_projected=self._projected(compressed.storage.tensors, comp),
            base_latency_projected=self.base_projected,
            seconds=time.perf_counter() - start, apply_seconds=compressed.seconds,
            second_order=getattr(compressed, "second_order", None),
            eval_tokens=self.samples.n_tokens, eval_fingerprint=self.samples.fingerprint,
            latency_unavailable=no_latency, latency_ab=ab, packed=packed,
            intervals=quality_intervals(windows), windows=windows, **task_fields,
        )


def load_eval_samples(tokenizer, source=None, seq_len: int = 256, max_samples: int | None = 64,
                      max_seq_len: int | None = None) -> TokenSamples:
    """Held-out evaluation windows: every window of the bundled held-out text (or a file / documents),
    in a fixed order, capped at `max_samples` (seq_len × max_samples tokens, e.g. 256 × 64 = 16k)."""
    from moeviz.data import bundled_documents, documents_from_file, tokenize_documents

    if source is None or source == "bundled":
        docs, name = bundled_documents("heldout"), "bundled held-out text"
    elif isinstance(source, list):
        docs, name = source, "given documents"
    else:
        docs, name = documents_from_file(source), str(source)
    samples = tokenize_documents(docs, tokenizer, 0, seq_len, seed=0, source=name, all_windows=True,
                                 max_seq_len=max_seq_len)
    if max_samples is not None and samples.n_samples > max_samples:
        samples = _balanced_subset(samples, max_samples)
    return samples


def _balanced_subset(samples: TokenSamples, n: int) -> TokenSamples:
    """The first windows of each domain, round-robin, so a capped eval set keeps every domain."""
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(samples.domains):
        by_domain.setdefault(d, []).append(i)
    chosen: list[int] = []
    while len(chosen) < n:
        for d in sorted(by_domain):
            if by_domain[d] and len(chosen) < n:
                chosen.append(by_domain[d].pop(0))
    chosen.sort()
    import hashlib

    fp = hashlib.sha256(f"{samples.fingerprint}|{chosen}".encode()).hexdigest()[:16]
    return TokenSamples(samples.input_ids[chosen], [samples.domains[i] for i in chosen], samples.source,
                        samples.seed, fp, sorted({samples.domains[i] for i in chosen}))

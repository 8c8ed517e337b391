"""Patient-level DP-SGD on the discriminator, with an accountant that is never reset.

How other code uses it
----------------------
::

    session = enable_dp(trainer, images, patients, cfg)     # validates D, calibrates σ, installs the private update
    for _ in range(steps):
        stats = trainer.train_step(session.next_real)       # Poisson batch of patients → one private D step each
        row = {**stats, **session.metrics()}                # epsilon, epsilon_rdp, epsilon_prv
    persistent["dp"] = session.state_dict()                 # JSON; keep with the trainer state and in checkpoints
    # next round / resume:
    session = enable_dp(trainer, images, patients, cfg, state=persistent["dp"])   # no recalibration, no reset

``enable_dp(trainer, images, patients, cfg, *, planned_steps=None, state=None, seed=None, engine="auto")``
    ``images``: (N, S, S) uint8 of this hospital; ``patients``: patient id per image or None. Returns a
    :class:`DPSession` and replaces ``trainer.d_update`` by a :class:`PrivateDiscriminatorUpdate`.
    ``planned_steps`` defaults to :func:`~medsyngan.privacy.accounting.planned_private_steps` (all rounds of
    the run; the plan is :func:`~medsyngan.privacy.accounting.plan_dp`, as printed by `medsyngan privacy`). Raises
    :class:`~medsyngan.errors.UserError` for a model Opacus cannot make private (naming the layer), lazy R1,
    a sampling rate above 1, a δ not below 1/units, or a target ε that the planned steps cannot meet.
``DPSession``
    ``next_real()`` (batch source for ``train_step``), ``epsilon()`` → {'rdp', 'prv', 'reported'} (reported =
    the larger), ``metrics()``, ``steps`` (private steps accounted), ``steps_left()``, ``noise_multiplier``,
    ``sample_rate``, ``delta``, ``unit``, ``units``, ``target_epsilon``, ``summary()``, ``state_dict()`` /
    ``load_state_dict()``. A step that would take ε above the target raises
    :class:`~medsyngan.privacy.accounting.BudgetExceeded` before anything is computed.

What is private and why
-----------------------
- **Unit.** A patient when patient ids exist (NIH has them): each step samples patients with probability
  q = expected batch / patients and takes one random image of each (``sampling.py``), so the accountant uses the
  patient rate. Image-level when no ids exist or every patient has one image; ``unit`` says which.
- **One private step = one D update.** Real samples' gradients are clipped per sample to C, summed, noised with
  N(0, σ²C²) and divided by the EXPECTED batch size (Opacus' convention for Poisson sampling: the denominator must
  not depend on the data). Every D update, including one with an empty batch (noise only), is one accountant step.
- **Generated samples are not clipped or noised.** The fake batch is a function of G, whose parameters are a
  post-processing of previous private D updates and public noise; the gradient of the mean fake loss therefore
  reveals nothing new about the data and is added unclipped. Opacus' DCGAN example instead clips real and fake
  per-sample gradients together in one batch (Opacus issue #418): that spends part of the clipping budget C on
  public samples, shrinks the real signal, and makes the denominator the real+fake batch, while the accountant is
  still charged for the real rate. Our scheme charges exactly one subsampled Gaussian step per D update and clips
  only what touches data. ``privacy.clip_fake`` clips each generated sample's gradient to C as well (still
  without noise or privacy cost): otherwise a D that finds the real images unlike anything it has seen (a D
  pretrained on phantoms meeting X-rays) gets per-sample real gradients clipped from norms of ~40 down to 1 while
  the fake side keeps its full size, and learns only to push fakes down. The WGAN-GP penalty interpolates
  real[i] with a fake and so sits inside sample i's clipped loss. The generator step sees data only through D
  (post-processing, no privacy cost, no per-sample machinery).
- **Lazy R1 is refused** under DP: it is an extra optimizer step on real images that would need its own clipping,
  noise and accounting, doubling the cost of the budget for a regularizer; use ``train.r1_gamma = 0``.
- **Released diagnostics.** The private update reports only the loss on generated images. The real-sample loss is
  a statistic of the private batch that the accountant does not cover, so it is not reported.
- **Secret randomness.** Amplification by subsampling assumes nobody knows who was sampled, and the noise is only
  noise if it cannot be predicted: the sampling and noise streams come from a seed drawn from the OS (not the run's
  public seed) and kept in the hospital's state, so a resumed run is exact and the seed never leaves the hospital.
  (Floating-point attacks on the Gaussian sampler, Mironov 2012, are out of scope, as in Opacus without
  ``secure_mode``.)
- **What ε covers:** every D update on real data of this hospital, for the whole run. Not covered: choices made
  by a person looking at private outputs (e.g. picking a checkpoint by a metric on real data) — do not do that.

Per-sample gradients: three engines, chosen automatically
---------------------------------------------------------
- ``ghost`` (default): book-keeping clipping (Bu et al. 2022) with mixed ghost norms (Li et al. 2022). Real and
  fake images go through D in ONE forward; one backward to the layer outputs gives every layer's output gradient;
  per-sample gradient norms of the real rows come from (layer input, output gradient) — as a Gram-matrix inner
  product where that is cheaper than materialising the per-sample gradient, else materialised in chunks — and the
  weight gradients are then computed once from output gradients weighted per row (c_i / B for real rows,
  1 / B_fake for fake rows). No per-sample gradient of the whole model is ever stored and there is no second
  backward through the network. Layers: Conv2d, Linear, GroupNorm and their equalized-lr forms.
- ``vmap``: torch.func ``vmap(grad(...))`` per-sample gradients, for any first-order model (fallback when a layer
  is unknown to ``ghost``).
- ``loop``: one backward per real sample; the only engine for losses that need a double backward (WGAN-GP).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import (
    PrivacyAccountant,
    one_off_release,
    plan_dp,
    planned_private_steps,
    resolve_unit,
)
from medsyngan.privacy.moments import MeanImageRelease
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer

ENGINES = ("auto", "ghost", "vmap", "loop")
STATE_VERSION = 1
_NOISE_STREAM = 2  # stream ids under the session seed: 0 sampling, 1 augmentation, 2 noise, 3 mean-image release
_RELEASE_STREAM = 3


# ====================================================================== model checks
def validate_discriminator(D: nn.Module, probe: Tensor) -> None:
    """One-line UserError when D cannot be trained with per-sample clipping; names the offending layer.

    Opacus' validators catch known layers (BatchNorm, ...); the probe catches any other layer that mixes samples
    (e.g. minibatch-stddev): changing sample 1 must leave sample 0's output unchanged.
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    for name, module in trainable_modules(D):
        check = ModuleValidator.VALIDATORS.get(type(module))
        errors = check(module) if check is not None else []
        if errors:
            reason = str(errors[0]).split(".")[0]
            raise UserError(
                f"discriminator layer '{name}' ({type(module).__name__}) cannot be made private: {reason}; "
                "set model.dp_compatible=true"
            )
    with torch.no_grad():
        x = probe[:2].clone()
        base = D(x)
        x[1] = -x[1]
        if not torch.allclose(D(x)[0], base[0], rtol=1e-4, atol=1e-5):
            raise UserError(
                f"the discriminator ({type(D).__name__}) mixes the samples of a batch (e.g. minibatch-stddev or "
                "BatchNorm), so per-sample gradients do not exist; set model.dp_compatible=true"
            )


# ====================================================================== ghost (book-keeping) clipping
class _Rule:
    """Per-sample squared gradient norms and row-weighted gradients of one layer's parameters.

    ``norms2(a, g)`` sees the real rows only. A rule that materialises the real rows' per-sample gradients to get
    their norms keeps them (``per_sample``), so that ``grads`` forms their weighted sum directly and runs the
    ordinary weight-gradient computation on the fake rows only.
    """

    # Materialised per-sample gradients kept between norms2 and grads (floats); larger ones are recomputed.
    KEEP_FLOATS = 1 << 25

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        self.per_sample: list[Tensor] | None = None

    def norms2(self, a: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def summed(self, a: Tensor, g: Tensor) -> list[Tensor]:
        """Gradients of the rows' summed loss, given output gradients already weighted per row."""
        raise NotImplementedError

    def grads(self, a: Tensor, g: Tensor, row_weights: Tensor) -> list[Tensor]:
        """Σ_rows weight_row · (per-row gradient), reusing the per-row gradients that norms2 kept (the first k
        rows: the real ones, and the generated ones too when they are clipped)."""
        weights = row_weights.view(-1, *([1] * (g.dim() - 1)))
        if self.per_sample is None:
            return self.summed(a, g * weights)
        k = self.per_sample[0].shape[0]
        kept = [torch.einsum("i,i...->...", row_weights[:k], ps) for ps in self.per_sample]
        self.per_sample = None
        if a.shape[0] == k:
            return kept
        return [r + f for r, f in zip(kept, self.summed(a[k:], g[k:] * weights[k:]))]


class _Conv(_Rule):
    def __init__(self, module: nn.Module, w_gain: float, b_gain: float, stride, padding, dilation):
        super().__init__(module)
        self.w_gain, self.b_gain = w_gain, b_gain
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)

    def norms2(self, a: Tensor, g: Tensor) -> Tensor:
        w, bias = self.module.weight, self.module.bias
        n, c_out, c_in = g.shape[0], g.shape[1], a.shape[1]
        gm = g.reshape(n, c_out, -1)  # (n, O, T)
        p, t = w[0].numel(), gm.shape[2]
        if t * (p + c_out) < c_out * p:
            # Ghost norm: ‖G_i U_iᵀ‖² = ⟨U_iᵀU_i, G_iᵀG_i⟩ (T×T Gram matrices), cheaper than the O×P gradient when
            # the output has few positions (the deep layers).
            u = F.unfold(a, w.shape[-2:], dilation=self.dilation, padding=self.padding, stride=self.stride)
            out = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(gm.transpose(1, 2), gm)).sum((1, 2))
            out = out * self.w_gain**2
        else:
            # Materialised per-sample gradients as one grouped convolution (the batch as groups): no unfold, whose
            # memory traffic dominates in the wide shallow layers. Chunked to bound memory.
            keep = n * w.numel() <= self.KEEP_FLOATS
            step = n if keep else max(1, self.KEEP_FLOATS // w.numel())
            chunks, norms = [], []
            for s in range(0, n, step):
                k = min(step, n - s)
                per = torch.nn.grad.conv2d_weight(
                    a[s:s + k].reshape(1, k * c_in, *a.shape[2:]), (k * c_out, c_in, *w.shape[2:]),
                    g[s:s + k].reshape(1, k * c_out, *g.shape[2:]), self.stride, self.padding, self.dilation, k,
                ).reshape(k, *w.shape) * self.w_gain
                norms.append(per.reshape(k, -1).square().sum(1))
                chunks.append(per)
            out = torch.cat(norms)
            if keep:
                self.per_sample = [chunks[0]] + ([gm.sum(2) * self.b_gain] if bias is not None else [])
        if bias is not None:
            out = out + gm.sum(2).square().sum(1) * self.b_gain**2
        return out

    def summed(self, a: Tensor, g: Tensor) -> list[Tensor]:
        w = self.module.weight
        out = [torch.nn.grad.conv2d_weight(a, w.shape, g, self.stride, self.padding, self.dilation) * self.w_gain]
        if self.module.bias is not None:
            out.append(g.sum((0, 2, 3)) * self.b_gain)
        return out


class _Linear(_Rule):
    def __init__(self, module: nn.Module, w_gain: float, b_gain: float):
        super().__init__(module)
        self.w_gain, self.b_gain = w_gain, b_gain

    def norms2(self, a: Tensor, g: Tensor) -> Tensor:
        if a.dim() != 2:
            raise RuntimeError("the ghost DP engine handles Linear layers on (B, features) inputs only")
        # The per-sample gradient g_i a_iᵀ is rank one, so its norm is ‖g_i‖·‖a_i‖.
        gg = g.square().sum(1)
        out = gg * a.square().sum(1) * self.w_gain**2
        if self.module.bias is not None:
            out = out + gg * self.b_gain**2
        return out

    def summed(self, a: Tensor, g: Tensor) -> list[Tensor]:
        out = [g.t().mm(a) * self.w_gain]
        if self.module.bias is not None:
            out.append(g.sum(0) * self.b_gain)
        return out


class _GroupNorm(_Rule):
    def _per_sample(self, a: Tensor, g: Tensor) -> list[Tensor]:
        m = self.module
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)
        dims = tuple(range(2, a.dim()))
        return [(g * xhat).sum(dims), g.sum(dims)]

    def norms2(self, a: Tensor, g: Tensor) -> Tensor:
        self.per_sample = self._per_sample(a, g)
        return sum(ps.square().sum(1) for ps in self.per_sample)

    def summed(self, a: Tensor, g: Tensor) -> list[Tensor]:
        return [ps.sum(0) for ps in self._per_sample(a, g)]


def _rule_for(module: nn.Module) -> _Rule | None:
    """The ghost rule of a layer, or None when the layer is not supported (the vmap engine is used then)."""
    from medsyngan.models.layers import EqualizedConv2d, EqualizedLinear

    if type(module) is nn.Conv2d:
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None
        return _Conv(module, 1.0, 1.0, module.stride, module.padding, module.dilation)
    if type(module) is EqualizedConv2d:
        return _Conv(module, module.weight_gain, 1.0, module.stride, module.padding, 1)
    if type(module) is nn.Linear:
        return _Linear(module, 1.0, 1.0)
    if type(module) is EqualizedLinear:
        return _Linear(module, module.weight_gain, module.bias_gain)
    if type(module) is nn.GroupNorm and module.affine:
        return _GroupNorm(module)
    return None


def ghost_rules(D: nn.Module) -> list[_Rule] | None:
    """Rules covering every trainable parameter of D exactly, or None when some parameter is not covered."""
    rules, covered = [], set()
    for module in D.modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        rule = _rule_for(module)
        # A layer with some parameters frozen and others not is left to the generic engine.
        if rule is None or not all(p.requires_grad for p in own):
            return None
        if {id(p) for p in own} != {id(p) for p in rule.params}:
            return None
        rules.append(rule)
        covered.update(id(p) for p in own)
    if covered != {id(p) for p in D.parameters() if p.requires_grad}:
        return None
    return rules


class _Replay:
    """Stands in for D inside the trainer's loss functions: returns logits already computed for exactly ``x``."""

    def __init__(self, x: Tensor, logits: Tensor):
        self.x, self.logits = x, logits

    def __call__(self, x: Tensor) -> Tensor:
        if x is not self.x:
            raise RuntimeError("the loss evaluated D on another input than the batch; use the 'loop' DP engine")
        return self.logits


class GhostEngine:
    """Book-keeping clipping over hooks that are active only inside :meth:`gradients`."""

    name = "ghost"

    def __init__(self, D: nn.Module, rules: list[_Rule]):
        self.D, self.rules = D, rules
        self._records: dict[int, list] = {}
        self._capturing = False
        self._handles = [r.module.register_forward_hook(self._hook(i)) for i, r in enumerate(rules)]

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._capturing:
                self._records.setdefault(index, []).append((inputs[0], output, inputs[0]._version, output._version))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def gradients(self, trainer: GANTrainer, real: Tensor, fake: Tensor, clip: float, expected: float,
                  fake_clip: float | None = None) -> tuple[dict[nn.Parameter, Tensor], Tensor]:
        n, m = real.shape[0], fake.shape[0]
        x = torch.cat([real, fake]) if n else fake
        for rule in self.rules:
            rule.per_sample = None
        self._records, self._capturing = {}, True
        try:
            with trainer._autocast():
                logits = self.D(x)
        finally:
            self._capturing = False
        records = self._records
        self._records = {}
        real_terms = trainer.d_real_loss(_Replay(real, logits[:n]), real, fake)
        fake_terms = trainer.d_fake_loss(_Replay(fake, logits[n:]), fake)
        used = []
        for index, calls in records.items():
            if len(calls) != 1:
                raise RuntimeError(f"layer {type(self.rules[index].module).__name__} ran {len(calls)} times in one "
                                   "forward; the ghost DP engine needs each layer once — use engine='vmap'")
            a, out, a_version, out_version = calls[0]
            if a._version != a_version or out._version != out_version:
                raise UserError(
                    f"an in-place operation modifies the input or output of discriminator layer "
                    f"{type(self.rules[index].module).__name__}; per-sample gradients would be wrong — set "
                    "model.dp_compatible=true"
                )
            used.append((self.rules[index], a, out))
        outs = [out for _, _, out in used]
        total = real_terms.sum() + fake_terms.sum()
        grads_out = torch.autograd.grad(total, outs, allow_unused=True)

        rows = n + m if fake_clip is not None else n
        norms2 = torch.zeros(rows, device=x.device)
        layers = []
        for (rule, a, _), g in zip(used, grads_out):
            if g is None:
                continue
            a, g = a.detach().float(), g.float()
            if rows:
                norms2 = norms2 + rule.norms2(a[:rows], g[:rows])
            layers.append((rule, a, g))
        factors = (clip / (norms2[:n].sqrt() + 1e-6)).clamp(max=1.0)
        fake_weights = torch.full((m,), 1.0 / m, device=x.device)
        if fake_clip is not None:
            fake_weights = fake_weights * (fake_clip / (norms2[n:].sqrt() + 1e-6)).clamp(max=1.0)
        row_weights = torch.cat([factors / expected, fake_weights])
        grads: dict[nn.Parameter, Tensor] = {}
        for rule, a, g in layers:
            for p, gp in zip(rule.params, rule.grads(a, g, row_weights)):
                grads[p] = gp.to(p.dtype)
        return grads, fake_terms.detach().mean()


# ====================================================================== generic engines
def _clipped_sum(per_sample: list[Tensor], clip: float) -> list[Tensor]:
    n = per_sample[0].shape[0]
    norms = torch.sqrt(sum(g.reshape(n, -1).float().square().sum(1) for g in per_sample))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factors.to(g.dtype), g) for g in per_sample]


class _SeparateFakeEngine:
    """Shared part of the generic engines: the fake term by an ordinary backward (or per sample when it is
    clipped too), the real one per sample."""

    name = ""

    def __init__(self, D: nn.Module):
        self.D = D

    def remove(self) -> None:
        pass

    def real_sums(self, trainer: GANTrainer, params: list[nn.Parameter], names: list[str], real: Tensor,
                  fake: Tensor, clip: float) -> list[Tensor]:
        raise NotImplementedError

    def fake_sums(self, trainer: GANTrainer, params: list[nn.Parameter], names: list[str], fake: Tensor,
                  clip: float) -> list[Tensor]:
        raise NotImplementedError

    def gradients(self, trainer: GANTrainer, real: Tensor, fake: Tensor, clip: float, expected: float,
                  fake_clip: float | None = None) -> tuple[dict[nn.Parameter, Tensor], Tensor]:
        named = [(k, p) for k, p in self.D.named_parameters() if p.requires_grad]
        names, params = [k for k, _ in named], [p for _, p in named]
        if fake_clip is None:
            fake_loss = trainer.d_fake_loss(self.D, fake).mean()
            fake_grads = torch.autograd.grad(fake_loss, params, allow_unused=True)
            grads = {p: (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, fake_grads)}
        else:
            with torch.no_grad():
                fake_loss = trainer.d_fake_loss(self.D, fake).mean()
            sums = self.fake_sums(trainer, params, names, fake, fake_clip)
            grads = {p: s / fake.shape[0] for p, s in zip(params, sums)}
        if real.shape[0]:
            for p, s in zip(params, self.real_sums(trainer, params, names, real, fake, clip)):
                grads[p] = grads[p] + s / expected
        return grads, fake_loss.detach()


class VmapEngine(_SeparateFakeEngine):
    """torch.func per-sample gradients of the real loss (any first-order model)."""

    name = "vmap"

    def _sums(self, params, names, batch: Tensor, loss_of: Callable, clip: float) -> list[Tensor]:
        from torch.func import functional_call, grad, vmap

        buffers = dict(self.D.named_buffers())
        values = {k: p.detach() for k, p in zip(names, params)}

        def loss_one(p: dict[str, Tensor], x: Tensor) -> Tensor:
            D = lambda y: functional_call(self.D, (p, buffers), (y,))  # noqa: E731
            return loss_of(D, x.unsqueeze(0))[0]

        per_sample = vmap(grad(loss_one), in_dims=(None, 0))(values, batch)
        return _clipped_sum([per_sample[k] for k in names], clip)

    def real_sums(self, trainer, params, names, real, fake, clip):
        return self._sums(params, names, real, trainer.d_real_loss, clip)

    def fake_sums(self, trainer, params, names, fake, clip):
        return self._sums(params, names, fake, trainer.d_fake_loss, clip)


class LoopEngine(_SeparateFakeEngine):
    """One backward per real sample: slow, but exact for losses with a double backward (WGAN-GP)."""

    name = "loop"

    @staticmethod
    def _sums(params, count: int, loss_of: Callable[[int], Tensor], clip: float) -> list[Tensor]:
        sums = [torch.zeros_like(p) for p in params]
        for i in range(count):
            grads = [g if g is not None else torch.zeros_like(p)
                     for p, g in zip(params, torch.autograd.grad(loss_of(i), params, allow_unused=True))]
            for s, c in zip(sums, _clipped_sum([g.unsqueeze(0) for g in grads], clip)):
                s.add_(c)
        return sums

    def real_sums(self, trainer, params, names, real, fake, clip):
        m = fake.shape[0]
        return self._sums(params, real.shape[0],
                          lambda i: trainer.d_real_loss(self.D, real[i:i + 1], fake[i % m:i % m + 1])[0], clip)

    def fake_sums(self, trainer, params, names, fake, clip):
        return self._sums(params, fake.shape[0], lambda i: trainer.d_fake_loss(self.D, fake[i:i + 1])[0], clip)


def make_engine(trainer: GANTrainer, engine: str = "auto"):
    if engine not in ENGINES:
        raise UserError(f"DP engine '{engine}' is unknown; use one of {', '.join(ENGINES)}")
    D = trainer.D
    if engine == "auto":
        engine = "loop" if trainer.use_gp else "ghost"
    if engine in ("ghost", "vmap") and trainer.use_gp:
        raise UserError(f"the WGAN-GP penalty needs a double backward, which the '{engine}' DP engine cannot do; "
                        "use engine 'loop' or train.loss=hinge / nonsaturating")
    if engine == "ghost":
        rules = ghost_rules(D)
        if rules is not None:
            return GhostEngine(D, rules)
        engine = "vmap"
    return VmapEngine(D) if engine == "vmap" else LoopEngine(D)


# ====================================================================== the private update
class PrivateDiscriminatorUpdate(DiscriminatorUpdate):
    """DP-SGD discriminator update: clipped, noised real gradients + the unclipped fake gradient; one accounted step.

    ``private_steps`` counts the optimizer steps this update took; the session's accountant is charged once per
    step, before the parameters change, so a crash can only over-count.
    """

    private = True

    def __init__(self, session: "DPSession", engine):
        self.session = session
        self.engine = engine
        self.private_steps = 0

    def step(self, trainer: GANTrainer, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        s = self.session
        s.check_budget()
        clip, sigma, expected = s.max_grad_norm, s.noise_multiplier, s.expected_batch
        trainer.opt_d.zero_grad(set_to_none=True)
        grads, fake_loss = self.engine.gradients(trainer, real, fake, clip, expected,
                                                 fake_clip=clip if s.clip_fake else None)
        noise_gen = s.noise_generator(s.steps)
        std = sigma * clip / expected
        for p in trainer.D.parameters():
            if not p.requires_grad:
                continue
            g = grads.get(p)
            if g is None:
                g = torch.zeros_like(p)
            if std > 0:
                noise = torch.randn(p.shape, generator=noise_gen, device=noise_gen.device, dtype=torch.float32)
                g = g + noise.to(device=p.device, dtype=p.dtype) * std
            p.grad = g
        s.accountant.step(1)
        trainer.opt_d.step()
        self.private_steps += 1
        return {"d_fake": fake_loss}

    def regularize(self, trainer: GANTrainer, real: Tensor) -> dict[str, Tensor]:
        raise UserError("lazy R1 touches real images outside DP-SGD; set train.r1_gamma=0 with privacy.dp")


def _stream_seed(secret: int, *stream: int) -> int:
    """A torch seed for one stream under the session's secret seed."""
    return int(np.random.SeedSequence([secret, *stream]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


# ====================================================================== the session
class DPSession:
    """The DP state of one hospital (or of a centralized run): sampler, accountant, σ, and the private update."""

    def __init__(self, trainer: GANTrainer, sampler: PoissonUnitSampler, accountant: PrivacyAccountant,
                 target_epsilon: float, max_grad_norm: float, guaranteed_steps: int, planned_steps: int,
                 engine: str = "auto", clip_fake: bool = False, release: MeanImageRelease | None = None):
        self.trainer = trainer
        self.clip_fake = bool(clip_fake)
        self.sampler = sampler
        self.accountant = accountant
        self.target_epsilon = float(target_epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.guaranteed_steps = int(guaranteed_steps)
        self.planned_steps = int(planned_steps)
        self.update = PrivateDiscriminatorUpdate(self, make_engine(trainer, engine))
        self.engine = self.update.engine.name
        self.release = release
        if release is not None:
            trainer.g_extra_loss = release

    # ------------------------------------------------------------------ what the trainer and the reports use
    @property
    def next_real(self) -> Callable[[], Tensor]:
        return self.sampler

    @property
    def released(self) -> list[tuple[float, float, int]]:
        """The accountant entries paid up front for the mean-image release; private D steps come after them."""
        return [one_off_release(self.release.noise_multiplier)] if self.release is not None else []

    @property
    def steps(self) -> int:
        """Private D steps accounted (the mean-image release is not one)."""
        return self.accountant.steps - len(self.released)

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.accountant.sample_rate

    @property
    def delta(self) -> float:
        return self.accountant.delta

    @property
    def unit(self) -> str:
        return self.sampler.unit

    @property
    def units(self) -> int:
        return self.sampler.units

    @property
    def expected_batch(self) -> int:
        return self.sampler.expected_batch

    def epsilon(self) -> dict[str, float]:
        """ε spent so far: {'rdp', 'prv', 'reported' (the larger)}."""
        return self.accountant.epsilon()

    def metrics(self) -> dict[str, float]:
        eps = self.epsilon()
        return {"epsilon": eps["reported"], "epsilon_rdp": eps["rdp"], "epsilon_prv": eps["prv"]}

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "units": self.units, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "delta": self.delta, "target_epsilon": self.target_epsilon, "steps": self.steps,
                "planned_steps": self.planned_steps, "engine": self.engine, "clip_fake": self.clip_fake,
                "mean_image_noise": self.release.noise_multiplier if self.release is not None else None,
                **self.metrics()}

    def _single_mechanism(self) -> bool:
        """The history is the planned release (if any), then D steps at the calibrated (σ, q) only."""
        h = self.accountant.history
        head, tail = h[:len(self.released)], h[len(self.released):]
        return head == self.released and all((sigma, q) == (self.noise_multiplier, self.sample_rate)
                                             for sigma, q, _ in tail)

    def check_budget(self, n: int = 1) -> None:
        """Raise BudgetExceeded when n more private steps would take ε above the target.

        Within the calibrated plan the answer is known without running the accountants (they take a fraction of
        a second each); past it, or after σ or q changed, the accountants decide.
        """
        if self.steps + n <= self.guaranteed_steps and self._single_mechanism():
            return
        self.accountant.check_budget(self.target_epsilon, n)

    def steps_left(self) -> int:
        """Private steps still allowed within the calibrated plan (0 past it; check_budget has the final word)."""
        return max(0, self.guaranteed_steps - self.steps) if self._single_mechanism() else 0

    def noise_generator(self, step: int) -> torch.Generator:
        gen = torch.Generator(device=self.trainer.device)
        gen.manual_seed(_stream_seed(self.sampler.seed, _NOISE_STREAM, step))
        return gen

    # ------------------------------------------------------------------ persistent state (plain JSON)
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant.state_dict(),
            "sampler": self.sampler.state_dict(),
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "guaranteed_steps": self.guaranteed_steps,
            "planned_steps": self.planned_steps,
            "mean_image": self.release.state_dict() if self.release is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"DP state has version {state.get('version')!r}; expected {STATE_VERSION}")
        self.accountant.load_state_dict(state["accountant"])
        self.sampler.load_state_dict(state["sampler"])
        self.target_epsilon = float(state["target_epsilon"])
        self.max_grad_norm = float(state["max_grad_norm"])
        self.guaranteed_steps = int(state["guaranteed_steps"])
        self.planned_steps = int(state["planned_steps"])
        if self.release is not None and state.get("mean_image") is not None:
            self.release.load_state_dict(state["mean_image"])


def privacy_unit(requested: str, images: int, patients: Sequence[str] | np.ndarray | None) -> tuple[str, int]:
    """(unit, number of units): patient-level when ids exist and group images, else image-level."""
    has_ids = patients is not None and len(patients) == images and all(str(x) for x in patients)
    if not has_ids:
        if requested == "patient":
            raise UserError(
                "privacy.unit = 'patient' but the dataset has no patient ids; set privacy.unit=image or auto"
            )
        return "image", images
    n_patients = len(np.unique(np.asarray(patients, dtype=str)))
    unit = resolve_unit(requested, n_patients, images)
    return unit, n_patients if unit == "patient" else images


def enable_dp(trainer: GANTrainer, images: np.ndarray, patients: Sequence[str] | np.ndarray | None, cfg: Config,
              *, planned_steps: int | None = None, state: dict[str, Any] | None = None, seed: int | None = None,
              engine: str = "auto") -> DPSession:
    """Make ``trainer``'s discriminator update DP-SGD and return the session (see the module docstring).

    With ``state`` (a previous ``DPSession.state_dict()``) σ, the seed and the accountant history come from it and
    nothing is recalibrated. ``seed`` fixes the secret sampling/noise seed (tests); default: drawn from the OS.
    """
    p = cfg.privacy
    if trainer.use_r1:
        raise UserError("lazy R1 touches real images outside DP-SGD; set train.r1_gamma=0 with privacy.dp")
    # A private generator: the probe must not move the global RNG (exact resume depends on it).
    probe_gen = torch.Generator(device=trainer.device).manual_seed(0)
    probe = torch.rand(2, 1, trainer.resolution, trainer.resolution, generator=probe_gen, device=trainer.device)
    probe = trainer.prepare_real(probe * 2 - 1)
    validate_discriminator(trainer.D, probe)

    unit, units = privacy_unit(p.unit, len(images), patients)
    plan_steps = planned_steps if planned_steps is not None else planned_private_steps(cfg)
    secret = seed if seed is not None else secrets.randbits(63)
    if state is not None:
        accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        guaranteed = 0  # taken from the state
    else:
        plan = plan_dp(units, cfg.train.batch_size, plan_steps, p.target_epsilon, p.delta, unit,
                       release_noise=p.release_noise)
        accountant = plan.accountant()
        guaranteed = plan_steps if accountant.epsilon_after(plan_steps)["reported"] <= p.target_epsilon else 0
    sampler = PoissonUnitSampler(images, patients if unit == "patient" else None, cfg.train.batch_size, unit,
                                 secret, trainer.device, cfg.data.augment)
    release = None
    if p.mean_image_size:
        release = MeanImageRelease(images, patients if unit == "patient" else None, p.mean_image_size,
                                   p.mean_image_clip, p.mean_image_noise, p.mean_image_weight, trainer.G,
                                   lambda: _stream_seed(sampler.seed, _RELEASE_STREAM))
    session = DPSession(trainer, sampler, accountant, p.target_epsilon, p.max_grad_norm, guaranteed, plan_steps,
                        engine, clip_fake=p.clip_fake, release=release)
    if state is not None:
        session.load_state_dict(state)
    if isinstance(trainer.d_update, PrivateDiscriminatorUpdate):
        trainer.d_update.engine.remove()  # a session rebuilt on the same trainer (next round): drop the old hooks
    trainer.d_update = session.update
    # float32 throughout: per-sample norms rounded to bf16 can leave a "clipped" gradient above C, and the
    # sensitivity bound that ε rests on must hold exactly, not to 3 significant digits.
    trainer.autocast_dtype = None
    return session

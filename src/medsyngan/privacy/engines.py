"""Per-sample gradient engines for DP-SGD on the discriminator, and the check that D admits them.

An engine computes, for one private D update, the clipped real-sample gradient sum and the generated-sample
gradient in one call::

    engine = make_engine(trainer, "auto")            # UserError for an engine the loss cannot use
    grads, fake_loss = engine.gradients(trainer, real, fake, clip, expected, fake_clip=None, real_c=None,
                                        fake_c=None)  # the batches' labels, for a conditional D
    # grads: {parameter: Σ_i clip_C(∇ real loss_i) / expected + ∇ mean fake loss}, before noise
    engine.remove()                                  # drop its hooks when another engine replaces it

Noise, accounting and the optimizer step belong to :mod:`medsyngan.privacy.session`. :func:`validate_discriminator`
refuses, in one line naming the layer, a D whose samples are not independent (no per-sample gradient exists).

Three engines, chosen automatically
-----------------------------------
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

This module is longer than the usual 400 lines: the ghost rules, the ghost engine and the two generic engines
share one contract and one clipping convention, and are read and checked against each other as a unit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsyngan.errors import UserError
from medsyngan.training.step import GANTrainer, conditioned

ENGINES = ("auto", "ghost", "vmap", "loop")


# ====================================================================== model checks
def validate_discriminator(D: nn.Module, probe: Tensor, probe_c: Tensor | None = None) -> None:
    """One-line UserError when D cannot be trained with per-sample clipping; names the offending layer.

    Opacus' validators catch known layers (BatchNorm, ...); the probe catches any other layer that mixes samples
    (e.g. minibatch-stddev): changing sample 1 (and its labels ``probe_c``, for a conditional D) must leave
    sample 0's output unchanged.
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
        c = None if probe_c is None else probe_c[:2].clone()
        base = conditioned(D, c)(x)
        x[1] = -x[1]
        if c is not None:
            c[1] = 1.0 - c[1]
        if not torch.allclose(conditioned(D, c)(x)[0], base[0], rtol=1e-4, atol=1e-5):
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
                  fake_clip: float | None = None, real_c: Tensor | None = None,
                  fake_c: Tensor | None = None) -> tuple[dict[nn.Parameter, Tensor], Tensor]:
        n, m = real.shape[0], fake.shape[0]
        x = torch.cat([real, fake]) if n else fake
        c = None if fake_c is None else (torch.cat([real_c, fake_c]) if n else fake_c)
        for rule in self.rules:
            rule.per_sample = None
        self._records, self._capturing = {}, True
        try:
            with trainer._autocast():
                logits = conditioned(self.D, c)(x)
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
                  fake: Tensor, clip: float, real_c: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def fake_sums(self, trainer: GANTrainer, params: list[nn.Parameter], names: list[str], fake: Tensor,
                  clip: float, fake_c: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def gradients(self, trainer: GANTrainer, real: Tensor, fake: Tensor, clip: float, expected: float,
                  fake_clip: float | None = None, real_c: Tensor | None = None,
                  fake_c: Tensor | None = None) -> tuple[dict[nn.Parameter, Tensor], Tensor]:
        named = [(k, p) for k, p in self.D.named_parameters() if p.requires_grad]
        names, params = [k for k, _ in named], [p for _, p in named]
        if fake_clip is None:
            fake_loss = trainer.d_fake_loss(conditioned(self.D, fake_c), fake).mean()
            fake_grads = torch.autograd.grad(fake_loss, params, allow_unused=True)
            grads = {p: (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, fake_grads)}
        else:
            with torch.no_grad():
                fake_loss = trainer.d_fake_loss(conditioned(self.D, fake_c), fake).mean()
            sums = self.fake_sums(trainer, params, names, fake, fake_clip, fake_c)
            grads = {p: s / fake.shape[0] for p, s in zip(params, sums)}
        if real.shape[0]:
            for p, s in zip(params, self.real_sums(trainer, params, names, real, fake, clip, real_c)):
                grads[p] = grads[p] + s / expected
        return grads, fake_loss.detach()


class VmapEngine(_SeparateFakeEngine):
    """torch.func per-sample gradients of the real loss (any first-order model)."""

    name = "vmap"

    def _sums(self, params, names, batch: Tensor, labels: Tensor | None, loss_of: Callable,
              clip: float) -> list[Tensor]:
        from torch.func import functional_call, grad, vmap

        buffers = dict(self.D.named_buffers())
        values = {k: p.detach() for k, p in zip(names, params)}

        def loss_one(p: dict[str, Tensor], x: Tensor, c: Tensor | None) -> Tensor:
            extra = () if c is None else (c.unsqueeze(0),)
            D = lambda y: functional_call(self.D, (p, buffers), (y, *extra))  # noqa: E731
            return loss_of(D, x.unsqueeze(0))[0]

        in_dims = (None, 0, None if labels is None else 0)
        per_sample = vmap(grad(loss_one), in_dims=in_dims)(values, batch, labels)
        return _clipped_sum([per_sample[k] for k in names], clip)

    def real_sums(self, trainer, params, names, real, fake, clip, real_c):
        return self._sums(params, names, real, real_c, trainer.d_real_loss, clip)

    def fake_sums(self, trainer, params, names, fake, clip, fake_c):
        return self._sums(params, names, fake, fake_c, trainer.d_fake_loss, clip)


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

    def real_sums(self, trainer, params, names, real, fake, clip, real_c):
        m = fake.shape[0]
        return self._sums(params, real.shape[0], lambda i: trainer.d_real_loss(
            conditioned(self.D, _row(real_c, i)), real[i:i + 1], fake[i % m:i % m + 1])[0], clip)

    def fake_sums(self, trainer, params, names, fake, clip, fake_c):
        return self._sums(params, fake.shape[0], lambda i: trainer.d_fake_loss(
            conditioned(self.D, _row(fake_c, i)), fake[i:i + 1])[0], clip)


def _row(c: Tensor | None, i: int) -> Tensor | None:
    return None if c is None else c[i:i + 1]


def make_engine(trainer: GANTrainer, engine: str = "auto") -> GhostEngine | VmapEngine | LoopEngine:
    """The engine for ``trainer``'s loss and D: 'auto' is 'loop' under WGAN-GP, else 'ghost', and 'ghost' becomes
    'vmap' when some trainable layer of D has no ghost rule."""
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

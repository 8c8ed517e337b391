"""The one GAN training step, shared by centralized training, every federated hospital, benchmarks and the demo.

The module is longer than most because the trainer's parts (per-sample D losses, the DP hook point, the G step and
its regularizers, precision, the growth stage, state exchange) touch the same networks and counters and are read
together; the growth schedule itself is :mod:`medsyngan.training.schedule`.

How other code uses it
----------------------
::

    trainer = GANTrainer(cfg)                     # builds G, D (and G_ema) from cfg.model, seeded by cfg.run.seed
    trainer.load_model_state(global_state)        # {"G.<name>": tensor, "D.<name>": tensor, ...}; any subset
    for _ in range(cfg.federated.local_steps):
        stats = trainer.train_step(loader.next)   # d_steps_per_g D steps, then one G step -> {"d_loss": ..., ...}
    update = trainer.model_state(("G", "D"))      # prefixed CPU-independent copies, same keys as loaded
    persistent = trainer.state_dict()             # models + optimizers + counters + RNG: keep across rounds

Federated code keeps one trainer per hospital (or rebuilds it and calls ``load_state_dict`` with the persisted
``state_dict()``) so that optimizer moments survive across rounds. ``trainer.images_seen`` / ``trainer.kimg``
count the real images D is meant to see: the configured batch per D step, never a batch's realised size (under
DP-SGD that size is private). ProGAN's growth schedule (:mod:`medsyngan.training.schedule`) follows this count;
in a federation the server sets it at the start of every round (:meth:`GANTrainer.set_images_seen`).

Differential privacy takes over the discriminator update only: it replaces ``trainer.d_update`` (a
:class:`DiscriminatorUpdate`) by an implementation that computes per-sample gradients of
``trainer.d_real_loss(D, real, fake)`` (a (B,) vector, sample i depends on real[i] only), clips and noises them,
then adds the gradient of ``trainer.d_fake_loss(D, fake).mean()`` unclipped (generated images are not private) and
steps ``trainer.opt_d``; it may also swap ``trainer.D`` for a wrapped module (e.g. Opacus' GradSampleModule) with
the same ``forward``. The generator step never goes through it: D's parameters have ``requires_grad=False``
during the G step, so no per-sample machinery runs there and D's weight gradients are not computed at all.

Discriminator augmentation (``train.augment``, :mod:`medsyngan.training.ada`): every image D sees goes through
``trainer.augment`` first — real and generated images in the D step (before ``d_update``, so under DP a real
image's augmentation sits inside its own clipped loss), the R1 inputs (the gradient is taken with respect to the
un-augmented image) and the generated batch of the G step. Each (D step, role) draws its transforms from a
generator of its own, seeded by the public run seed, so ``trainer.rng`` is untouched and no realised batch size
carries into later draws. With ADA, ``trainer.ada`` tunes p from Σ sign(D(real)) per expected batch; its state is
part of :meth:`GANTrainer.state_dict`.

Class-conditional models (``model.condition``, :mod:`medsyngan.data.labels`): the real-batch source returns
``(images, labels)`` instead of images, generated batches draw their labels from ``trainer.label_source`` (set
with :meth:`GANTrainer.set_label_source` before the first step) through the trainer's own label RNG, and every D
call takes the batch's labels. A discriminator update receives them as ``real_c`` / ``fake_c`` and evaluates the
loss functions on ``conditioned(D, c)``, so that sample i's loss still depends on real[i] and its labels only.

This module is longer than the usual 400 lines: the step, its schedule, its conditioning and its state are one
unit that every training path (centralized, each hospital, DP) shares.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsyngan.config import Config
from medsyngan.data.labels import LabelDistribution, LabelLayout
from medsyngan.errors import UserError
from medsyngan.runtime import bf16_pays, select_device
from medsyngan.training import losses
from medsyngan.training.ada import AdaptiveP, AugmentPipe, DiffAugment
from medsyngan.training.schedule import GrowthSchedule

MODEL_PARTS = ("G", "D", "G_ema")
# The trainer's own latent/noise RNG is seeded apart from the weight-initialization RNG, its label RNG apart from both.
_RNG_SALT = 0x6D7367
_LABEL_SALT = 0x6C6162
_AUGMENT_SALT = 0x617567
# Roles of the images an augmentation is drawn for within one D step.
AUG_REAL, AUG_FAKE, AUG_G, AUG_R1 = 0, 1, 2, 3


# Families whose training step measured faster with channels-last tensors on a CPU (benchmarks/bench_families.py
# --variants; figures in docs/results.md#speed): ProGAN 1.31× images per CPU second at 64 px. DCGAN's 1.07× is
# left out, as are StyleGAN2 and StyleGAN3 (no gain).
CHANNELS_LAST_ON_CPU: frozenset[str] = frozenset({"progan"})
# Families whose training step measured slower in bf16 than in float32 on a CPU where the probe finds bf16 faster:
# StyleGAN3's filtered activations (0.45 against 1.19 images/s a core at 64 px; docs/results.md#speed).
BF16_SLOWER_ON_CPU: frozenset[str] = frozenset({"stylegan3"})


def _use_channels_last(device: torch.device, arch: str, setting: str) -> bool:
    if setting != "auto":
        return setting == "on"
    # Tensor cores and cuDNN want NHWC; on a CPU (oneDNN) it depends on the family.
    return device.type == "cuda" or (device.type == "cpu" and arch in CHANNELS_LAST_ON_CPU)


def _freeze_all_but_last(net: nn.Module, trainable: int) -> None:
    """Freeze every parameterized layer of ``net`` except the last ``trainable`` on the image's path to the logit,
    counted back from the output, and the label projection (part of the head whenever a head trains)."""
    image_path, label_path = _discriminator_layers(net)
    keep = {id(m) for m in image_path[-trainable:] + label_path}
    for layer in net.modules():
        if id(layer) not in keep and any(True for _ in layer.parameters(recurse=False)):
            layer.requires_grad_(False)


def _discriminator_layers(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers the image flows through, in the order it reaches them; layers that see only the labels) of a
    discriminator, traced on one zero batch. Registration order is not flow order: a conditional D registers its
    label projection after its output layer. With D's weights not requiring grad, a layer's input requires grad
    exactly when it depends on the image. Layers the trace does not reach (a growing D's later stages) are
    neither, so they stay frozen."""
    side = getattr(net, "stage_resolution", net.resolution)
    x = torch.zeros(2, 1, side, side, device=next(net.parameters()).device, requires_grad=True)
    c = torch.zeros(2, net.c_dim, device=x.device) if net.c_dim else None
    image_path: list[nn.Module] = []
    label_path: list[nn.Module] = []

    def record(module: nn.Module, inputs: tuple) -> None:
        if any(True for _ in module.parameters(recurse=False)) and module not in image_path + label_path:
            seen = any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
            (image_path if seen else label_path).append(module)

    hooks = [m.register_forward_pre_hook(record) for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    was_training = net.training
    try:
        net.requires_grad_(False).eval()  # eval: the trace must not move BatchNorm's running statistics
        net(x, c) if c is not None else net(x)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
        net.train(was_training)
    return image_path, label_path


def _reset_moments(optimizer: torch.optim.Optimizer) -> None:
    """Forget Adam's moments and step counts (its bias correction starts again); parameters are untouched."""
    optimizer.state.clear()


def _adam(params: Iterable[Tensor], lr: float, betas: tuple[float, float], eps: float,
          lazy_interval: int | None) -> torch.optim.Adam:
    if lazy_interval:
        c = losses.lazy_adam_factor(lazy_interval)
        lr, betas = lr * c, (betas[0] ** c, betas[1] ** c)
    # foreach: one kernel per group of tensors instead of one per parameter; same arithmetic as the loop.
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def build_augmentation(cfg: Config) -> tuple[AugmentPipe | DiffAugment | None, AdaptiveP | None]:
    """(the pipe every image passes before D, the p controller) for ``train.augment``; None where there is none."""
    t = cfg.train
    if t.augment == "none":
        return None, None
    if t.augment == "diffaugment":
        return DiffAugment(t.augment_p), None
    ada = AdaptiveP(t.ada_target, t.ada_interval, t.ada_kimg, p=t.augment_p) if t.ada_target > 0 else None
    return AugmentPipe(t.augment_p, xflip=t.augment_xflip), ada


def conditioned(D: Callable[..., Tensor], c: Tensor | None) -> Callable[[Tensor], Tensor]:
    """D as a function of images alone: ``D`` itself when there are no labels, else x ↦ D(x, c) (c row i goes with
    image row i, also for the WGAN-GP interpolates of the real batch)."""
    return D if c is None else (lambda x: D(x, c))


def split_batch(batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(images, labels or None) of what a real-batch source returned."""
    return (batch[0], batch[1]) if isinstance(batch, tuple) else (batch, None)


def draw_real(next_real: Callable[[], Tensor | tuple[Tensor, Tensor]], draws: int) -> tuple[Tensor, Tensor | None]:
    """(images, labels or None) of ``draws`` consecutive real batches, concatenated."""
    if draws == 1:
        return split_batch(next_real())
    parts = [split_batch(next_real()) for _ in range(draws)]
    labels = None if parts[0][1] is None else torch.cat([c for _, c in parts])
    return torch.cat([x for x, _ in parts]), labels


class DiscriminatorUpdate:
    """How one discriminator update turns losses into a parameter step (replaceable, e.g. by DP-SGD).

    The default is the ordinary non-private update: one backward of mean(real terms) + mean(fake terms), then an
    optimizer step. ``regularize`` is the lazy R1 step (StyleGAN2), which touches real images too. ``real_c`` and
    ``fake_c`` are the batches' labels (None for an unconditional model).
    """

    private = False

    def step(self, trainer: "GANTrainer", real: Tensor, fake: Tensor, real_c: Tensor | None = None,
             fake_c: Tensor | None = None) -> dict[str, Tensor]:
        trainer.opt_d.zero_grad(set_to_none=True)
        real_loss = trainer.d_real_loss(conditioned(trainer.D, real_c), real, fake).mean()
        fake_loss = trainer.d_fake_loss(conditioned(trainer.D, fake_c), fake).mean()
        (real_loss + fake_loss).backward()
        trainer.opt_d.step()
        return {"d_loss": (real_loss + fake_loss).detach(), "d_real": real_loss.detach(), "d_fake": fake_loss.detach()}

    def regularize(self, trainer: "GANTrainer", real: Tensor, real_c: Tensor | None = None) -> dict[str, Tensor]:
        trainer.opt_d.zero_grad(set_to_none=True)
        loss = trainer.d_reg_loss(conditioned(trainer.D, real_c), real).mean()
        loss.backward()
        trainer.opt_d.step()
        return {"r1": loss.detach()}


class GANTrainer:
    """G, D, the generator EMA, their optimizers and counters, and the step that trains them.

    Args:
        cfg: the run configuration (model, train and run sections are read).
        device: where to train; default ``select_device(cfg.run.device)``.
        generator, discriminator: prebuilt networks (tests, benchmarks); default: built from ``cfg.model``.
        d_update: the discriminator-update strategy; default the non-private :class:`DiscriminatorUpdate`.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        device: torch.device | str | None = None,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        d_update: DiscriminatorUpdate | None = None,
    ):
        self.cfg = cfg
        t = cfg.train
        self.device = torch.device(device) if device is not None else select_device(cfg.run.device)
        self.arch = cfg.model.arch
        self.loss = t.loss
        # Weights depend on the seed only, not on whatever consumed the global RNG before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            if generator is None or discriminator is None:
                from medsyngan.models.registry import build_discriminator, build_generator
            G = generator if generator is not None else build_generator(cfg.model)
            D = discriminator if discriminator is not None else build_discriminator(cfg.model)
        self.channels_last = _use_channels_last(self.device, cfg.model.arch, t.channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=fmt).train()
        self.D = D.to(self.device, memory_format=fmt).train()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if t.ema_kimg > 0 else None
        if t.d_trainable_last:
            _freeze_all_but_last(self.D, t.d_trainable_last)
        self.d_params = [p for p in self.D.parameters() if p.requires_grad]
        if t.compile:
            # Fuses BatchNorm/activations and their backward with the convolutions' neighbours; the networks and
            # the algorithm are unchanged (state_dict keys too: see unwrap).
            self.G, self.D = torch.compile(self.G), torch.compile(self.D)
        self.autocast_dtype = torch.bfloat16 if (
            t.amp == "bf16" or (t.amp == "auto" and bf16_pays(self.device)
                                and not (self.device.type == "cpu" and self.arch in BF16_SLOWER_ON_CPU))
        ) else None

        self.style_based = style = self.arch in ("stylegan2", "stylegan3")
        self.use_gp = t.loss == "wgan-gp" and t.gp_weight > 0
        self.use_r1 = style and t.r1_gamma > 0
        self.use_pl = style and t.pl_weight > 0
        self.mixing_p = t.style_mixing_p if style else 0.0
        self.growth = GrowthSchedule.of(cfg)
        self.progressive = self.growth is not None

        betas = (t.beta1, t.beta2)
        self.opt_g = _adam(self.G.parameters(), t.lr_g, betas, t.adam_eps, t.pl_interval if self.use_pl else None)
        self.opt_d = _adam(self.d_params, t.lr_d, betas, t.adam_eps, t.r1_interval if self.use_r1 else None)
        self.pl_reg = losses.PathLengthRegularizer().to(self.device) if self.use_pl else None
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(cfg.run.seed ^ _RNG_SALT)
        self.label_layout = LabelLayout.of(cfg.model.condition)
        self.conditional = self.label_layout.dim > 0
        self.label_source: LabelDistribution | None = None
        self.label_rng = torch.Generator().manual_seed(cfg.run.seed ^ _LABEL_SALT)
        self.d_update = d_update or DiscriminatorUpdate()
        # An extra generator-loss term, fake batch → (term, diagnostic): the private mean-image anchor
        # (privacy.moments) installs one; None trains G on the adversarial loss alone.
        self.g_extra_loss: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self.augment, self.ada = build_augmentation(cfg)
        self._real_signs: Tensor | None = None  # Σ sign(D(real)) of the latest D step, for ADA

        self.step = 0  # generator steps
        self.d_step = 0  # discriminator steps
        self.images_seen = 0  # real images shown to D
        self.stage: tuple[int, float] | None = None
        self._sync_stage()

    # ------------------------------------------------------------------ counters and schedule
    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    @property
    def resolution(self) -> int:
        return int(self.G.resolution)

    @property
    def batch_size(self) -> int:
        """The configured D batch at the current stage: what each D step adds to ``images_seen``."""
        if self.growth is None or self.stage is None:
            return self.cfg.train.batch_size
        return self.growth.batch(self.stage[0])

    def set_images_seen(self, images: int) -> None:
        """Continue from the count ``images`` (a federation's server sets it at every round), at its stage."""
        self.images_seen = int(images)
        self._sync_stage()

    def _sync_stage(self) -> None:
        if self.growth is None:
            return
        stage = self.growth.stage(self.images_seen)
        if stage == self.stage:
            return
        if self.stage is not None and (stage[0] != self.stage[0] or (stage[1] == 1.0) != (self.stage[1] == 1.0)):
            # New layers fade in, or the fade-in ends: fresh Adam moments for both networks, as the reference resets
            # its optimizers whenever the level of detail crosses an integer (reset_opt_for_new_lod, Karras et al.).
            _reset_moments(self.opt_g)
            _reset_moments(self.opt_d)
        for net in (self.G, self.D, self.G_ema):
            if net is not None:
                net.set_stage(*stage)
        self.stage = stage

    # ------------------------------------------------------------------ building blocks
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def latents(self, n: int) -> Tensor:
        return torch.randn(n, self.G.z_dim, device=self.device, generator=self.rng)

    def _uniform(self, *shape: int) -> Tensor:
        return torch.rand(*shape, device=self.device, generator=self.rng)

    def augmented(self, x: Tensor, role: int) -> Tensor:
        """``x`` as D sees it: through ``self.augment`` (unchanged when there is none or p = 0), with the
        transforms drawn for this D step and ``role`` (AUG_REAL, AUG_FAKE, AUG_G, AUG_R1)."""
        if self.augment is None or self.augment.p == 0:
            return x
        seq = np.random.SeedSequence([self.cfg.run.seed, _AUGMENT_SALT, self.d_step, role])
        gen = torch.Generator(device=self.device).manual_seed(int(seq.generate_state(1, np.uint64)[0]) & (2**63 - 1))
        return self.augment(x, generator=gen)

    def _adapt_p(self, batch: int) -> None:
        """ADA: account the D step's Σ sign(D(real)) per expected batch (the configured batch of the stage: adaptive
        p is refused under DP, whose realised Poisson batch sizes must not steer anything) and set the pipe's p."""
        if self.ada is None or self._real_signs is None:
            return
        self.augment.p = self.ada.accumulate(float(self._real_signs), batch)
        self._real_signs = None

    def set_label_source(self, source: LabelDistribution) -> None:
        """Where generated batches' labels come from (a conditional model needs one before its first step)."""
        if source.layout != self.label_layout:
            raise UserError(f"label source for groups {list(source.layout.groups)} but model.condition is "
                            f"{list(self.label_layout.groups)}; use the run's own configuration")
        self.label_source = source

    def fake_labels(self, n: int) -> Tensor | None:
        """Labels of n generated images from the label source (None for an unconditional model)."""
        if not self.conditional:
            return None
        if self.label_source is None:
            raise UserError("a conditional model trains with a label source; train through medsyngan.workflows or "
                            "call trainer.set_label_source first")
        return self.label_source.sample(n, self.label_rng).to(self.device)

    def generate(self, n: int, c: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """n generated images for training (style mixing for StyleGAN2/3) and their ws (None if not style-based);
        ``c``: their labels, for a conditional model."""
        z = self.latents(n)
        labels = {} if c is None else {"c": c}
        with self._autocast():
            if not self.style_based:
                return self.G(z, **labels), None
            ws = self.G.mapping(z, **labels)
            if self.mixing_p > 0:
                # Draw both numbers every time so the RNG stream does not depend on the coin flip.
                coin, cutoff = self._uniform(2).tolist()
                z2 = self.latents(n)
                if coin < self.mixing_p and ws.shape[1] > 1:
                    cut = 1 + int(cutoff * (ws.shape[1] - 1))
                    ws = torch.cat([ws[:, :cut], self.G.mapping(z2, update_w_avg=False, **labels)[:, cut:]], dim=1)
            return self.G.synthesis(ws), ws

    def prepare_real(self, real: Tensor) -> Tensor:
        """Move a real batch to the device; for ProGAN, bring it to the stage resolution and fade like G does."""
        real = real.to(self.device, non_blocking=True)
        if self.progressive and self.stage is not None:
            res, alpha = self.stage
            if real.shape[-1] != res:
                real = F.avg_pool2d(real, real.shape[-1] // res)
            if alpha < 1.0 and res > 4:
                # During a fade-in G's output is a blend of the upsampled old stage and the new one; reals get the
                # same blend, or D could tell them apart by sharpness alone (Karras et al. 2018, appendix A.1).
                coarse = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")
                real = torch.lerp(coarse, real, alpha)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        return real

    # ------------------------------------------------------------------ losses (D terms per sample)
    def d_real_loss(self, D: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor | None = None) -> Tensor:
        """Per-sample D loss on real images, (B,): adversarial term, drift, and the WGAN-GP penalty.

        The penalty of sample i interpolates real[i] with fake[i mod len(fake)], so each entry depends on one real
        image only (what DP-SGD needs); ``fake`` may be None when no penalty is used.
        """
        t = self.cfg.train
        with self._autocast():
            logits = D(real).float()
        if self.ada is not None:
            self._real_signs = logits.detach().sign().sum()
        terms = losses.d_real_terms(self.loss, logits, t.drift)
        if self.use_gp:
            if fake is None:
                raise ValueError("WGAN-GP needs the generated batch to interpolate with")
            idx = torch.arange(real.shape[0], device=real.device) % fake.shape[0]
            eps = self._uniform(real.shape[0])
            with self._autocast():
                terms = terms + t.gp_weight * losses.gradient_penalty(D, real, fake[idx], eps)
        return terms

    def d_fake_loss(self, D: Callable[[Tensor], Tensor], fake: Tensor) -> Tensor:
        """Per-sample D loss on generated images, (B,)."""
        with self._autocast():
            logits = D(fake).float()
        return losses.d_fake_terms(self.loss, logits)

    def d_reg_loss(self, D: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
        """Lazy R1 per sample, (B,): γ/2 · ‖∇D(x)‖² · interval (the interval makes up for running it rarely); x is
        the un-augmented image, D sees it augmented."""
        t = self.cfg.train
        with self._autocast():
            penalty = losses.r1_penalty(lambda x: D(self.augmented(x, AUG_R1)), real)
        return penalty * (t.r1_gamma / 2 * t.r1_interval)

    # ------------------------------------------------------------------ the step
    def train_step(self, next_real: Callable[[], Tensor | tuple[Tensor, Tensor]]) -> dict[str, float]:
        """``d_steps_per_g`` discriminator steps, then one generator step; returns the step's losses.

        The generated batch of the last D step is reused for the G step (as in the textbook DCGAN loop): G runs
        forward once per iteration, and its BatchNorm statistics are updated once.
        """
        t = self.cfg.train
        out: dict[str, Tensor] = {}
        fake = fake_c = None
        batch = self.batch_size
        draws = batch // t.batch_size  # a ProGAN stage's larger batch is drawn as several loader batches
        for i in range(t.d_steps_per_g):
            real, real_c = draw_real(next_real, draws)
            real = self.prepare_real(real)
            if self.conditional:
                if real_c is None:
                    raise UserError("a conditional model needs labelled real batches; build the loader with labels")
                real_c, fake_c = real_c.to(self.device), self.fake_labels(batch)
            else:
                real_c = None
            last = i == t.d_steps_per_g - 1
            with torch.set_grad_enabled(last):
                fake, ws = self.generate(batch, fake_c)
            out.update(self.d_update.step(self, self.augmented(real, AUG_REAL), self.augmented(fake.detach(), AUG_FAKE),
                                          real_c=real_c, fake_c=fake_c))
            self._adapt_p(batch)
            self.d_step += 1
            self.images_seen += batch
            if self.use_r1 and self.d_step % t.r1_interval == 0:
                out.update(self.d_update.regularize(self, real, real_c=real_c))

        for p in self.d_params:
            p.requires_grad_(False)
        try:
            self.opt_g.zero_grad(set_to_none=True)
            with self._autocast():
                logits = conditioned(self.D, fake_c)(self.augmented(fake, AUG_G)).float()
            g_loss = losses.g_terms(self.loss, logits).mean()
            total = g_loss
            if self.g_extra_loss is not None:
                term, out["g_extra"] = self.g_extra_loss(fake.float())
                total = g_loss + term
            total.backward()
            self.opt_g.step()
            out["g_loss"] = g_loss.detach()
            self.step += 1
            if self.use_pl and self.step % t.pl_interval == 0:
                out["pl"] = self._path_length_step()
        finally:
            for p in self.d_params:
                p.requires_grad_(True)

        self._update_ema()
        self._sync_stage()
        out.update(self._augment_stats())
        names = list(out)
        values = torch.stack([v.float() for v in out.values()]).tolist()  # one device sync for all numbers
        return dict(zip(names, values))

    def _augment_stats(self) -> dict[str, Tensor]:
        if self.augment is None:
            return {}
        stats = {"augment_p": self.augment.p}
        if self.ada is not None and self.ada.r_t is not None:
            stats["ada_rt"] = self.ada.r_t
        return {k: torch.tensor(v, device=self.device) for k, v in stats.items()}

    def _path_length_step(self) -> Tensor:
        t = self.cfg.train
        self.opt_g.zero_grad(set_to_none=True)
        n = max(1, t.batch_size // t.pl_batch_shrink)
        images, ws = self.generate(n, self.fake_labels(n))
        noise = torch.randn(images.shape, device=self.device, generator=self.rng)
        penalty = self.pl_reg(images, ws, noise).mean()
        (penalty * (t.pl_weight * t.pl_interval)).backward()
        self.opt_g.step()
        return penalty.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.G_ema is None:
            return
        t = self.cfg.train
        beta = losses.ema_beta(self.batch_size, t.ema_kimg, self.images_seen, t.ema_rampup)
        ema_params, params = list(self.G_ema.parameters()), list(self.G.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------ state
    def networks(self) -> dict[str, nn.Module]:
        nets = {"G": self.G, "D": self.D}
        if self.G_ema is not None:
            nets["G_ema"] = self.G_ema
        return nets

    def model_state(self, parts: Iterable[str] = ("G", "D")) -> dict[str, Tensor]:
        """Detached CPU copies of the named networks' state, keys prefixed ``G.``, ``D.``, ``G_ema.``."""
        nets = self.networks()
        state: dict[str, Tensor] = {}
        for part in parts:
            if part not in nets:
                raise KeyError(f"no network {part!r}; have {sorted(nets)}")
            for key, value in unwrap(nets[part]).state_dict().items():
                state[f"{part}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
        return state

    def parameter_names(self, parts: Iterable[str] = ("G", "D")) -> set[str]:
        """The prefixed keys of :meth:`model_state` that are trainable parameters (not buffers)."""
        nets = self.networks()
        return {f"{part}.{name}" for part in parts for name, _ in unwrap(nets[part]).named_parameters()}

    def load_model_state(self, state: Mapping[str, Tensor], *, keep_stage: bool = False) -> None:
        """Load prefixed state (any subset of G/D/G_ema); each network present must match exactly, except that a
        ProGAN state may leave out its stage buffers.

        A ProGAN trainer's stage follows its schedule count (``images_seen``), whatever stage the state carries;
        with ``keep_stage`` it takes the stage of the state's G instead: a generator to sample from, such as a
        federation's global one, whose stage the server set. Training from there returns to the count's stage.
        """
        nets = self.networks()
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if part not in MODEL_PARTS:
                raise KeyError(f"state key {key!r} does not start with one of {MODEL_PARTS}")
            grouped.setdefault(part, {})[name] = value
        for part, sub in grouped.items():
            if part in nets:
                unwrap(nets[part]).load_state_dict(sub)
        self.stage = None
        if keep_stage and self.progressive and "stage_res" in grouped.get("G", {}):
            g = grouped["G"]
            self.stage = (int(g["stage_res"]), float(g["stage_alpha"]))
            for net in nets.values():
                net.set_stage(*self.stage)
        else:
            self._sync_stage()
        if "G_ema" not in grouped and "G" in grouped and self.G_ema is not None and not self.step:
            # A fresh trainer given only G starts its EMA from that G, not from its own random init.
            self.G_ema.load_state_dict(unwrap(self.G).state_dict())

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: networks, optimizers, regularizer state, counters, RNG."""
        return {
            "models": self.model_state(tuple(self.networks())),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "pl_mean": self.pl_reg.pl_mean.detach().cpu() if self.pl_reg is not None else None,
            "counters": self.counters(),
            "rng": self.rng.get_state(),
            **({"label_rng": self.label_rng.get_state()} if self.conditional else {}),
            **({"ada": self.ada.state_dict()} if self.ada is not None else {}),
        }

    def load_state_dict(self, state: Mapping) -> None:
        # Counters first: reaching the saved stage resets Adam (as growth does) before the saved moments load.
        self.set_counters(state["counters"])
        self.load_model_state(state["models"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.pl_reg is not None and state.get("pl_mean") is not None:
            self.pl_reg.pl_mean.copy_(state["pl_mean"])
        self.rng.set_state(state["rng"])
        if self.conditional:
            self.label_rng.set_state(state["label_rng"])
        if self.ada is not None:
            # A checkpoint of a run without ADA starts p where the configuration says.
            if "ada" in state:
                self.ada.load_state_dict(state["ada"])
            self.augment.p = self.ada.p

    def counters(self) -> dict[str, float | int]:
        res, alpha = self.stage if self.stage is not None else (self.resolution, 1.0)
        return {
            "step": self.step, "d_step": self.d_step, "images_seen": self.images_seen, "kimg": self.kimg,
            "stage_resolution": res, "alpha": alpha,
        }

    def set_counters(self, counters: Mapping[str, float | int]) -> None:
        self.step = int(counters["step"])
        self.d_step = int(counters["d_step"])
        self.images_seen = int(counters["images_seen"])
        self._sync_stage()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network behind a wrapper (Opacus GradSampleModule, torch.compile) so state keys stay stable."""
    for attr in ("_module", "_orig_mod"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return module

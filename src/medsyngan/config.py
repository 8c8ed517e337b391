"""The one typed configuration shared by every entry point.

A run is described by a TOML preset (a file path, or the name of one shipped in ``medsyngan/presets/``) plus
``--set section.key=value`` overrides. The resolved configuration is written to the run directory as
``config.toml`` so that a later command (resume, generate, evaluate) reads back exactly what the run used. Every
section forbids unknown keys, so a typo is an error that names the key rather than a silently ignored setting.

Every file read (preset, ``config.toml``, a checkpoint's embedded configuration) goes through
:func:`medsyngan.config_versions.migrate` first, so files written by an older MedSynGAN keep working.
"""

from __future__ import annotations

import tomllib
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medsyngan.config_versions import CONFIG_VERSION, migrate
from medsyngan.errors import UserError

# Package data, so that an installed (not only an editable) MedSynGAN finds `--config dcgan64`.
PRESETS: Traversable = files("medsyngan") / "presets"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("run", description="Human-readable name of the run, shown in logs and the report.")
    seed: int = Field(
        0, description="Seed of the training's random choices (initial weights, batch order, latents, sampling); "
        "the data itself is drawn from data.seed."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")


class AugmentSection(Section):
    hflip_p: float = Field(
        0.0, ge=0, le=1,
        description="Probability of a horizontal flip. Off by default: the heart is on the left and a GAN "
        "should not learn mirrored anatomy.",
    )
    rotate_p: float = Field(0.0, ge=0, le=1, description="Probability of a small rotation.")
    rotate_deg: float = Field(5.0, ge=0, le=45, description="Largest rotation, degrees (uniform in ±).")
    zoom_p: float = Field(0.0, ge=0, le=1, description="Probability of a zoom/translate.")
    zoom_range: float = Field(0.1, ge=0, le=0.5, description="Largest relative zoom (uniform in ±).")
    translate: float = Field(0.05, ge=0, le=0.5, description="Largest shift as a fraction of the image size.")


class DataSection(Section):
    source: Literal["phantoms", "covid-cxr", "phantoms+covid-cxr", "prepared"] = Field(
        "phantoms", description="'phantoms' builds the embedded procedural set; 'covid-cxr' the public COVID-19 "
        "chest X-rays of the shared data folder (MEDSYNGAN_SHARED_DATA), prepared once at data.size; "
        "'phantoms+covid-cxr' both, every film of each once, their patient ids and image names prefixed with "
        "their part's name ('phantoms:', 'covid-cxr:'); 'prepared' reads `path`."
    )
    path: str = Field("", description="Prepared dataset directory (from `medsyngan data prepare`).")
    split: Literal["all", "train_val", "test"] = Field(
        "all", description="Train only on images of this split of the dataset (NIH's official lists, or the "
        "phantoms' own); the demo trains on train_val and evaluates on test."
    )
    size: int = Field(64, description="Image side in pixels; must equal model.resolution.")
    seed: int = Field(
        0, description="Seed of the data: the phantoms, the on-the-fly hospital partition and each hospital's "
        "held-out patients. Fixed data with another run.seed measures run-to-run spread."
    )
    phantom_patients: int = Field(
        200, ge=1, description="Synthetic patients when source = 'phantoms' or 'phantoms+covid-cxr'."
    )
    phantom_images_per_patient: int = Field(3, ge=1, description="Images per synthetic patient.")
    augment: AugmentSection = Field(default_factory=AugmentSection)


class ModelSection(Section):
    arch: Literal["dcgan", "progan", "stylegan2", "stylegan3"] = Field(
        "dcgan", description="Generator/discriminator family."
    )
    resolution: int = Field(64, description="Output side in pixels (a power of two).")
    z_dim: int = Field(100, ge=1, description="Latent dimension.")
    dp_compatible: bool = Field(
        False,
        description="Build the discriminator in its DP-SGD form: GroupNorm for BatchNorm, no minibatch-stddev, "
        "no in-place activations, nothing that mixes the samples of a batch.",
    )
    ngf: int = Field(64, ge=1, description="DCGAN generator width (feature maps at the last layer).")
    ndf: int = Field(64, ge=1, description="DCGAN discriminator width (feature maps at the first layer).")
    fmap_base: int = Field(
        4096, ge=16, description="ProGAN/StyleGAN2/StyleGAN3 channel budget: channels = base / res (StyleGAN3's "
        "generator: base / (2 · layer cutoff), which is base / res at its last layers)."
    )
    fmap_max: int = Field(256, ge=8, description="ProGAN/StyleGAN2/StyleGAN3 cap on channels per layer.")
    w_dim: int = Field(256, ge=1, description="StyleGAN2/StyleGAN3 intermediate latent dimension.")
    mapping_layers: int = Field(2, ge=1, description="StyleGAN2/StyleGAN3 mapping network depth.")
    sg3_config: Literal["t", "r"] = Field(
        "t", description="StyleGAN3 config: 't' translation equivariant (3x3 convolutions); 'r' rotation "
        "equivariant too (1x1 convolutions, radially symmetric filters, generator fmap_base and fmap_max doubled)."
    )
    sg3_layers: int = Field(
        14, ge=3, description="StyleGAN3 synthesis layers between the Fourier-feature input and toRGB (NVlabs: 14)."
    )
    sg3_magnitude_ema_beta: float = Field(
        0.999, ge=0, lt=1, description="StyleGAN3 decay of each layer's running input magnitude (NVlabs' training "
        "uses 0.5 ** (batch / 20000), 0.9989 at batch 32)."
    )
    condition: list[Literal["findings", "view", "sex", "age"]] = Field(
        default_factory=list,
        description="Label groups G and D are conditioned on (medsyngan.data.labels: the 14 NIH findings, view "
        "PA/AP, sex, age band); empty: an unconditional model.",
    )


class TrainSection(Section):
    loss: Literal["nonsaturating", "wgan-gp", "hinge"] = Field("nonsaturating", description="Adversarial loss.")
    batch_size: int = Field(64, ge=1, description="Images per D step.")
    lr_g: float = Field(2e-4, gt=0, description="Generator learning rate.")
    lr_d: float = Field(2e-4, gt=0, description="Discriminator learning rate.")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    d_steps_per_g: int = Field(1, ge=1, description="Discriminator steps per generator step.")
    steps: int = Field(2000, ge=1, description="Generator steps of a centralized run.")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient-penalty weight.")
    drift: float = Field(1e-3, ge=0, description="WGAN-GP drift term (ProGAN).")
    r1_gamma: float = Field(1.0, ge=0, description="StyleGAN2 R1 weight (0 disables).")
    r1_interval: int = Field(16, ge=1, description="Lazy R1: every N D steps.")
    pl_weight: float = Field(2.0, ge=0, description="StyleGAN2 path-length weight (0 disables).")
    pl_interval: int = Field(4, ge=1, description="Lazy path-length regularization: every N G steps.")
    style_mixing_p: float = Field(0.9, ge=0, le=1, description="StyleGAN2 style-mixing probability.")
    ema_kimg: float = Field(0.0, ge=0, description="Half-life of the generator EMA in thousands of images (0: no EMA).")
    ema_rampup: float = Field(
        0.0, ge=0, description="EMA half-life at most this fraction of the images seen so far (0: no ramp-up)."
    )
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    pl_batch_shrink: int = Field(2, ge=1, description="StyleGAN2 path-length regularization runs on batch / N.")
    kimg_per_phase: float = Field(
        600.0, gt=0, description="ProGAN: thousands of real images per fade-in and per stable phase (the paper's 600); "
        "a run needs train.steps to cover 1 + 2 × doublings phases and is refused when it stops short."
    )
    batch_by_resolution: dict[int, int] = Field(
        default_factory=dict,
        description="ProGAN: the D batch at each stage resolution, e.g. {4 = 64, 8 = 64, 16 = 32}; a resolution not "
        "listed trains at train.batch_size. Each must be a multiple of train.batch_size (it is drawn as that many "
        "batches). Not with privacy.dp: DP-SGD's sampling rate is planned for one batch size.",
    )
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    sample_every: int = Field(500, ge=1, description="Steps between sample grids.")
    log_every: int = Field(50, ge=1, description="Steps between metrics.jsonl rows.")
    amp: Literal["auto", "off", "bf16"] = Field(
        "auto", description="bf16 autocast; 'auto': on CUDA, and on a CPU where a short fp32-vs-bf16 convolution "
        "benchmark at first use finds bf16 faster (cached per CPU model and torch version in the cache folder). DP-SGD "
        "always trains D in float32.",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="Channels-last (NHWC) tensors for G, D and real batches; 'auto': on CUDA, on a CPU "
        "only for the families where it measured faster (docs/results.md#speed).",
    )
    compile: bool = Field(
        False,
        description="torch.compile G and D (inductor): minutes of compilation at start, faster steps after; "
        "leave off under DP-SGD (Opacus hooks) and for short runs.",
    )
    d_trainable_last: int = Field(
        0, ge=0,
        description="Train only the last N parameterized layers on D's path from image to logit, counted back from the "
        "output, and freeze the others (0: train all); a conditional D's label projection trains with them. With a D "
        "pretrained on public data (train.init_from) this is DP fine-tuning of a head: DP-SGD's noise grows with "
        "the number of trained parameters.",
    )
    init_from: str = Field(
        "",
        description="Start from the G/D weights of this checkpoint or run directory (same architecture and size), "
        "e.g. a model trained on public phantoms; optimizer state and counters start fresh. Empty: random init.",
    )
    label_source: Literal["data", "public"] = Field(
        "data", description="Conditional models: where generated images' labels are drawn from. 'data': the "
        "training data's label frequencies (under privacy.dp released once with Gaussian noise, part of target ε); "
        "'public': the label frequencies of a public NIH metadata table (train.label_table), at no privacy cost."
    )
    label_table: str = Field(
        "", description="Public label table whose label frequencies train.label_source = 'public' uses, at no "
        "privacy cost: an NIH Data_Entry CSV (metadata of the whole release) or a prepared dataset folder of public "
        "or consented films (a donated tuning set, closer to the hospitals' own mix); never the hospitals' training "
        "films. Empty: the shared NIH sample's Data_Entry CSV. Every hospital reads it."
    )
    augment: Literal["none", "ada", "diffaugment"] = Field(
        "none", description="Discriminator augmentation (medsyngan.training.ada): every image that reaches D, real "
        "and generated, in the D step, R1 and the G step. 'ada': ADA's pipeline (Karras et al. 2020) with p adapted "
        "to D's overfitting; 'diffaugment': colour, translation and cutout (Zhao et al. 2020) with the fixed p "
        "train.augment_p. Per sample, so it works under DP-SGD."
    )
    augment_p: float = Field(
        0.0, ge=0, le=1, description="Probability of each augmentation: ADA's starting p (its only p when "
        "train.ada_target = 0; at most 0.99, as at p = 1 the transforms leak into G), DiffAugment's fixed p (the "
        "paper's is 1)."
    )
    ada_target: float = Field(
        0.6, ge=0, lt=1, description="ADA: the r_t = E[sign D(real)] that p is tuned to (the paper's 0.6); 0 keeps "
        "p fixed at train.augment_p (the only form under privacy.dp and in federated runs)."
    )
    ada_interval: int = Field(4, ge=1, description="ADA: D steps between adjustments of p.")
    ada_kimg: float = Field(
        500.0, gt=0, description="ADA: thousands of images over which p can move from 0 to 1 (the paper's 500 is "
        "for runs of thousands of kimg; a run of tens of kimg needs tens)."
    )
    augment_xflip: bool = Field(
        False, description="ADA: mirror images too. Off: the heart is on the left, a mirrored chest is another anatomy."
    )


class FederatedSection(Section):
    enabled: bool = Field(False, description="Train across simulated or deployed hospitals.")
    hospitals: int = Field(3, ge=1, description="Number of hospitals (Flower SuperNodes / virtual clients).")
    partition: str = Field("", description="CSV from `medsyngan data partition`; empty: partition on the fly.")
    scheme: Literal["iid", "patient", "label-skew", "quantity-skew"] = Field(
        "patient", description="Partition scheme used when no partition file is given."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for label-skew / quantity-skew.")
    rounds: int = Field(10, ge=1, description="Federated rounds.")
    local_steps: int = Field(50, ge=1, description="Generator steps each hospital takes per round.")
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of hospitals sampled per round.")
    quorum: int = Field(2, ge=1, description="Fewest replies that complete a round.")
    round_timeout_s: float = Field(600.0, gt=0, description="Seconds a round waits for replies.")
    round_retries: int = Field(1, ge=0, description="Retries of a round that missed its quorum before stopping.")
    strategy: Literal["fedavg", "fedavgm", "fedadam", "fedprox"] = Field(
        "fedavg", description="Server aggregation: FedAvg, FedAvgM (server momentum), FedAdam, FedProx."
    )
    server_lr: float = Field(
        0.0, ge=0, description="Server learning rate of FedAvgM / FedAdam (0: the strategy's default, 1.0 / 0.01)."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM server momentum β.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight.")
    share_discriminator: bool = Field(True, description="False keeps discriminators local (only G is shared).")
    eval_every: int = Field(1, ge=1, description="Rounds between evaluations.")
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of each hospital's patients kept out of training for the evaluation "
        "it reports (0: all train, no hospital-side evaluation)."
    )
    client_cpus: int = Field(
        1, ge=1, description="Simulation: CPU cores per virtual hospital (Ray runs cores ÷ client_cpus at once)."
    )


class PrivacySection(Section):
    dp: bool = Field(False, description="Patient-level DP-SGD on each hospital's discriminator (Opacus).")
    target_epsilon: float = Field(
        1.0, gt=0, description="ε over the whole run, per hospital, replace-one (a hospital's hospital.max_epsilon "
        "caps it)."
    )
    delta: float = Field(0.0, ge=0, lt=1, description="δ; 0 means min(1e-5, 1 / (2 · privacy units)).")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm.")
    clip_only: bool = Field(
        False, description="Ablation that gives NO privacy: DP-SGD exactly as with privacy.dp (Poisson sampling of "
        "units, per-unit clipping to max_grad_norm, the same trainable layers) but noise σ = 0, so ε = ∞ wherever ε "
        "is reported and target_epsilon is not used. It tells the cost of clipping from that of noise. Needs "
        "privacy.dp = true; a hospital refuses it unless its policy has dp_required = false, min_noise_multiplier "
        "= 0 and max_epsilon = inf."
    )
    clip_fake: bool = Field(
        False, description="Also clip each generated image's D gradient to max_grad_norm (no noise, no privacy "
        "cost), so that the generated side cannot outweigh the clipped real side."
    )
    unit: Literal["auto", "patient", "image"] = Field("auto", description="Privacy unit; auto: patient when ids exist.")
    mean_image_size: int = Field(
        0, ge=0, description="With DP: each hospital releases once, under the Gaussian mechanism, the k×k mean "
        "image of its films (k = this value; 0: off), and G's loss gains a term matching it (privacy.moments). "
        "It is part of target_epsilon: DP-SGD's σ is calibrated for what the release leaves."
    )
    mean_image_noise: float = Field(2.0, gt=0, description="Noise multiplier σ of the mean-image release.")
    mean_image_clip: float = Field(
        0.4, gt=0, description="Clipping of a unit's deviation from G's own mean image, as an RMS per k×k pixel on "
        "the [-1, 1] scale (the L2 bound is this × k)."
    )
    mean_image_weight: float = Field(1.0, ge=0, description="Weight of the mean-image term in G's loss.")
    label_noise: float = Field(
        5.0, gt=0, description="Conditional models with train.label_source = 'data': noise multiplier σ of the "
        "one-off Gaussian release of each hospital's label counts (privacy.label_release); part of target_epsilon."
    )
    client_dp: bool = Field(False, description="DP-FedAvg: clip each hospital's update, noise the aggregate.")
    client_clip: float = Field(1.0, gt=0, description="Client-level DP clipping norm.")
    client_noise: float = Field(1.0, ge=0, description="Client-level DP noise multiplier.")
    update_clip: float = Field(0.0, ge=0, description="Clip each hospital's update to this L2 norm (0: off).")
    quantize_bits: Literal[0, 8, 16] = Field(0, description="Stochastic quantization of updates (0: float32).")
    encrypt: bool = Field(False, description="AES-256-GCM end to end between hospital and aggregator.")
    secagg: bool = Field(False, description="Secure aggregation: the server learns only the sum.")
    secagg_threshold: float = Field(0.66, gt=0, le=1, description="Fraction of hospitals needed to unmask.")
    secagg_neighbours: int = Field(0, ge=0, description="SecAgg+ neighbours per hospital (0: complete graph).")
    compression: Literal["zlib", "lzma", "none"] = Field(
        "zlib", description="Compression of quantized updates on the plain (not secure-aggregation) path."
    )
    checkpoint_key: str = Field(
        "", description="Key file (32 bytes, from `medsyngan privacy keygen`) that encrypts the run's checkpoints "
        "at rest (AES-256-GCM); `medsyngan train` stores it as an absolute path. Empty: checkpoints in plaintext, "
        "except a DP run's secret seed, sealed under the run's own key file RUN/keys/checkpoint.key."
    )

    @model_validator(mode="after")
    def _clip_only_needs_dp(self) -> "PrivacySection":
        if self.clip_only and not self.dp:
            raise ValueError("privacy.clip_only runs DP-SGD's clipping and sampling without noise and needs "
                             "privacy.dp = true; set privacy.dp = true or privacy.clip_only = false")
        return self

    @property
    def release_noise(self) -> float:
        """σ of the one-off mean-image release that target_epsilon also pays for (0: none)."""
        return self.mean_image_noise if self.mean_image_size else 0.0


class HospitalSection(Section):
    """A hospital's own privacy policy (``medsyngan.federated.policy``). A deployed hospital reads it from the TOML
    file named in its ``--node-config policy=PATH``, never from the aggregator; in a simulation this section is the
    policy of every virtual hospital."""

    dp_required: bool = Field(True, description="Refuse to train without patient-level DP-SGD (privacy.dp).")
    max_epsilon: float = Field(
        1.0, gt=0, description="Largest ε this hospital spends over the run (replace-one). It calibrates for the "
        "smaller of this and privacy.target_epsilon, and stops training when its ledger would pass it. inf allows "
        "privacy.clip_only (ε = ∞) when dp_required is false too."
    )
    max_delta: float = Field(1e-5, gt=0, lt=1, description="Largest δ this hospital accepts.")
    min_noise_multiplier: float = Field(
        0.0, ge=0, description="Smallest DP-SGD noise multiplier σ it trains with, whatever the calibration gives."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Refuse a per-sample clipping norm above this.")
    encrypt_required: bool = Field(True, description="Refuse to send updates that are not encrypted end to end.")
    secagg_required: bool = Field(True, description="Refuse to send updates outside secure aggregation.")
    unit: Literal["patient", "image"] = Field(
        "patient", description="The privacy unit it protects at least: 'patient' refuses image-level DP."
    )
    max_rounds: int = Field(0, ge=0, description="Refuse rounds past this number (0: no limit).")


class EvalSection(Section):
    metrics: str = Field("default", description="Comma-separated metric names, or 'default'.")
    feature_extractor: str = Field("random", description="'inception', 'random' or a TorchScript file.")
    num_samples: int = Field(1000, ge=2, description="Synthetic images generated for evaluation.")
    nn_threshold: float = Field(0.95, gt=0, le=1, description="SSIM above which a sample is flagged a near-copy.")


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    federated: FederatedSection = Field(default_factory=FederatedSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    hospital: HospitalSection = Field(default_factory=HospitalSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.data.size != self.model.resolution:
            raise ValueError(
                f"data.size ({self.data.size}) differs from model.resolution ({self.model.resolution}); "
                "set both to the same value"
            )
        if self.privacy.mean_image_size and not self.privacy.dp:
            raise ValueError(
                f"privacy.mean_image_size = {self.privacy.mean_image_size} is a DP release; set privacy.dp=true "
                "or privacy.mean_image_size=0"
            )
        if self.privacy.mean_image_size > self.model.resolution:
            raise ValueError(
                f"privacy.mean_image_size ({self.privacy.mean_image_size}) exceeds model.resolution "
                f"({self.model.resolution}); use a side of at most the image's"
            )
        self._check_batch_by_resolution()
        if len(set(self.model.condition)) != len(self.model.condition):
            raise ValueError(f"model.condition lists a group twice ({self.model.condition}); name each once")
        self._check_augment()
        self._check_compile()
        if self.federated.enabled and self.federated.quorum > self.federated.hospitals:
            raise ValueError(
                f"federated.quorum ({self.federated.quorum}) exceeds federated.hospitals "
                f"({self.federated.hospitals}); lower the quorum or add hospitals"
            )
        return self

    def _check_augment(self) -> None:
        t = self.train
        if t.augment == "diffaugment" and t.augment_p == 0:
            raise ValueError("train.augment = 'diffaugment' with train.augment_p = 0 augments nothing; set "
                             "train.augment_p (the paper's is 1)")
        if t.augment == "ada" and t.augment_p > 0.99:
            raise ValueError(f"train.augment_p = {t.augment_p}: ADA's p stays at most 0.99 (at p = 1 the transforms "
                             "leak into G); lower it")
        if t.augment == "ada" and t.ada_target > 0 and (self.privacy.dp or self.federated.enabled):
            # docs/privacy.md and docs/training.md: p tuned from D's outputs on real images would be a release of
            # private data under DP, and a statistic no federated party may see outside secure aggregation.
            where = "privacy.dp" if self.privacy.dp else "federated runs"
            raise ValueError(f"adaptive augmentation (train.ada_target = {t.ada_target}) is refused with {where}; "
                             "set train.ada_target=0 and a fixed train.augment_p (e.g. 0.2)")

    def _check_compile(self) -> None:
        t = self.train
        if not t.compile:
            return
        style = self.model.arch in ("stylegan2", "stylegan3")
        twice = {"the WGAN-GP gradient penalty": t.loss == "wgan-gp" and t.gp_weight > 0,
                 "R1": style and t.r1_gamma > 0, "path-length regularization": style and t.pl_weight > 0}
        for name, used in twice.items():
            if used:  # torch 2.13's compiled autograd (aot_autograd) has no double backward
                raise ValueError(f"train.compile cannot train with {name}: torch.compile does not differentiate "
                                 "gradients twice; set train.compile=false")

    def _check_batch_by_resolution(self) -> None:
        t, batches = self.train, self.train.batch_by_resolution
        if not batches:
            return
        if self.model.arch != "progan":
            raise ValueError("train.batch_by_resolution sets ProGAN's batch per stage; remove it for "
                             f"model.arch = {self.model.arch!r}")
        stages = [2**k for k in range(2, self.model.resolution.bit_length())]
        for resolution, batch in sorted(batches.items()):
            if resolution not in stages:
                raise ValueError(f"train.batch_by_resolution has {resolution} px, not a stage of a "
                                 f"{self.model.resolution}-px ProGAN ({', '.join(map(str, stages))})")
            if batch < 1 or batch % t.batch_size:
                raise ValueError(f"train.batch_by_resolution gives {resolution} px a batch of {batch}, not a multiple "
                                 f"of train.batch_size ({t.batch_size}); use a multiple or lower train.batch_size")
        if self.privacy.dp and set(batches.values()) != {t.batch_size}:
            raise ValueError("train.batch_by_resolution changes the batch, and so DP-SGD's sampling rate, during the "
                             "run; remove it with privacy.dp = true (every stage then trains at train.batch_size)")

    def to_toml(self) -> str:
        return tomli_w.dumps({"version": CONFIG_VERSION, **self.model_dump(mode="json")})


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(config)"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'; see `medsyngan config show` for the valid keys"
    return f"{origin}: bad value for '{key}': {first['msg']}"


def _parse_value(text: str) -> Any:
    """Read an override's value as TOML when possible (numbers, booleans, lists), else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise UserError(f"override '{item}': the key must name a section, e.g. train.steps=100")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value.strip())
    return tree


def preset_names() -> list[str]:
    """The presets shipped with the package, by name."""
    return sorted(p.name.removesuffix(".toml") for p in PRESETS.iterdir() if p.name.endswith(".toml"))


def _read_preset(name_or_path: str | Path) -> tuple[str, str]:
    """(TOML text, where it came from) of a file path, or of a shipped preset named with or without '.toml'."""
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), str(path)
    name = str(name_or_path).removesuffix(".toml")
    preset = PRESETS / f"{name}.toml"
    if preset.is_file():
        return preset.read_text(), f"preset {name}"
    raise UserError(f"config '{name_or_path}' not found; give a TOML path or one of: {', '.join(preset_names())}")


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return migrate(tomllib.loads(text), origin)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{origin}: not valid TOML ({exc}); fix the file's syntax") from None


def _validate(tree: dict[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_format_error(exc, origin)) from None


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A preset (path or shipped name; none: every default), upgraded to this version, then ``overrides``."""
    origin, tree = "configuration", {}
    if preset is not None:
        text, origin = _read_preset(preset)
        tree = _parse(text, origin)
    return _validate(apply_overrides(tree, overrides or []), origin)


def config_from_toml_text(text: str, origin: str) -> Config:
    return _validate(_parse(text, origin), origin)


def schema_markdown() -> str:
    """The configuration reference, generated from the schema so that documentation never drifts from code."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |",
             f"| `version` | int | `{CONFIG_VERSION}` | Version of the file's format. An older file is migrated on "
             "reading; a file without it is version 1, in which run.seed also seeds the data (data.seed); up to version 2, "
             "train.kimg_per_phase defaults to 60. |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            kind = getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
            if getattr(annotation, "__origin__", None) is Literal:
                kind = " \\| ".join(repr(a) for a in annotation.__args__)
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | {kind} | `{default!r}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines)

"""One-line definitions of every metric key, shown beside the value in the report's table.

Every key a registered metric returns (:mod:`medsyngan.metrics.registry`) must match a pattern here;
tests/test_metrics_registry.py checks it for each metric.
"""

from __future__ import annotations

import re

# (pattern on the key, definition); first match wins. Keys carry their protocol: sample count (k = thousand),
# resolution in pixels, feature network ('inception', 'random', 'ts-<name>-<hash>'), and k for k-NN metrics.
DEFINITIONS: tuple[tuple[str, str], ...] = (
    (r"^fid\d", "Fréchet Inception distance: ‖μr−μf‖² + tr(Σr+Σf−2(ΣrΣf)^½) on Inception-v3 pool3 features "
     "(TF 2015-12-05 weights, clean-fid resize to 299). Lower is better; biased upward at small sample counts."),
    (r"^fd\d", "Fréchet distance as FID but on the named feature network; comparable only with the same network, "
     "seed, sample count and resolution."),
    (r"^kid\d.*_std$", "Standard deviation of KID over its random subsets."),
    (r"^kid\d", "Kernel inception distance: unbiased MMD² with kernel (xᵀy/d+1)³, averaged over random subsets. "
     "Unbiased, so usable at small sample counts; lower is better."),
    (r"^precision", "Precision (Kynkäänniemi 2019): share of synthetic samples inside the k-NN ball of some real sample (fidelity)."),
    (r"^recall", "Recall (Kynkäänniemi 2019): share of real samples inside the k-NN ball of some synthetic sample (diversity)."),
    (r"^density", "Density (Naeem 2020): mean count of real k-NN balls holding a synthetic sample, over k; ≈1 when distributions match."),
    (r"^coverage", "Coverage (Naeem 2020): share of real samples whose k-NN ball holds a synthetic sample."),
    (r"^ssim_nn_train_max$", "Highest SSIM between any synthetic image and its nearest training image (worst case)."),
    (r"^ssim_nn_train", "Mean over synthetic images of the SSIM to the most similar training image (Gaussian σ=1.5 "
     "window, scikit-image convention). A memorization signal, not a quality score."),
    (r"^psnr_nn_train", "Mean PSNR (dB, data range 1) between each synthetic image and its closest training image by MSE."),
    (r"^mse_nn_train", "Mean MSE (images in [0, 1]) between each synthetic image and its closest training image."),
    (r"^near_copies", "Synthetic images whose nearest-training-image SSIM exceeds the near-copy threshold."),
    (r"^msssim_div_fake", "Mean MS-SSIM over random pairs of synthetic images; lower is more diverse."),
    (r"^msssim_div_real", "Mean MS-SSIM over random pairs of real images: the reference for msssim_div_fake."),
    (r"^ppl_.*_lpips", "Perceptual path length (Karras 2019): E[LPIPS(G(l(t)), G(l(t+ε)))/ε²], ε=1e-4, "
     "1st–99th percentile filter; wend = W-space end points, zfull = Z-space slerp."),
    (r"^ppl_.*_randomfeat", "Path length as PPL but with the random network's squared feature distance instead "
     "of LPIPS; not comparable with published PPL."),
    (r"^dcr_ratio", "median NN distance synthetic→train over median NN distance holdout→train; well below 1 "
     "means synthetic images sit closer to training images than unseen real ones (memorization)."),
    (r"^dcr_median_synth", "Median distance from a synthetic image to its nearest training image."),
    (r"^dcr_median_holdout", "Median distance from a holdout image to its nearest training image."),
    (r"^(auroc|c2st)_.*_lo$", "Lower end of the 95 % bootstrap interval (real patients resampled; synthetic films "
     "for label fidelity) of the figure named without _lo."),
    (r"^(auroc|c2st)_.*_hi$", "Upper end of the 95 % bootstrap interval (real patients resampled; synthetic films "
     "for label fidelity) of the figure named without _hi."),
    (r"^auroc_gap_real_synth", "Mean AUROC of the synthetic-trained classifier minus the real-trained one's, on the "
     "real evaluation patients; near 0 means the synthetic films teach what the real ones do."),
    (r"^auroc_gap_dp_synth", "Mean AUROC of the synthetic-trained classifier minus that of one trained on the real "
     "films with patient-level DP-SGD at the stated ε: above 0, the generator beats releasing a DP classifier."),
    (r"^auroc_gap_real_augment", "Mean AUROC over the rare findings with the rare findings' synthetic films added "
     "to the real training films, minus without them."),
    (r"^auroc_real.*_rare_mean$", "Mean AUROC over the rare findings of the classifier trained on the real "
     "training films."),
    (r"^auroc_augment.*_rare_mean$", "Mean AUROC over the rare findings of the classifier trained on the real films "
     "plus the synthetic films of rare findings."),
    (r"^auroc_augment", "AUROC on real evaluation patients for this rare finding, classifier trained on the real "
     "films plus the synthetic films of rare findings."),
    (r"^auroc_fidelity.*_mean$", "Label fidelity: mean over the labels of the AUROC of the real-trained classifier on "
     "the synthetic films against the labels they were generated from; 0.5 = the films do not show their labels, "
     "below 0.5 = drawn the wrong way round."),
    (r"^auroc_fidelity", "Label fidelity for this label: AUROC of the real-trained classifier on the synthetic films "
     "against the label each film was generated from."),
    (r"^auroc_synth.*_mean$", "Mean over the scored labels of the AUROC on real evaluation patients of a small CNN "
     "trained on the synthetic films only (train synthetic, test real)."),
    (r"^auroc_real.*_mean$", "Mean over the scored labels of the AUROC of the same CNN trained on the real training "
     "films: the reference for the synthetic-trained one."),
    (r"^auroc_dp.*_mean$", "Mean over the scored labels of the AUROC of the same CNN trained on the real training "
     "films with patient-level DP-SGD at the stated ε: the baseline a DP generator must beat."),
    (r"^auroc_synth", "AUROC on real evaluation patients for this label, small CNN trained on the synthetic films "
     "only."),
    (r"^auroc_real", "AUROC on real evaluation patients for this label, small CNN trained on the real training films."),
    (r"^auroc_dp", "AUROC on real evaluation patients for this label, small CNN trained on the real training films "
     "with patient-level DP-SGD at the stated ε."),
    (r"^c2st_auroc", "Classifier two-sample test: AUROC of a small CNN telling held-out synthetic films from real "
     "ones; 0.5 = indistinguishable, 1 = every synthetic film recognised."),
    (r"^reid_synth_rate", "Share of synthetic films that a patient-verification network matches to some training "
     "patient at the stated false-match rate; should not exceed reid_holdout_rate."),
    (r"^reid_holdout_rate", "Share of held-out real films (no training patient's) matched to some training patient "
     "at the same threshold: the rate strangers reach."),
    (r"^reid_synth_max_score", "Highest verifier score (cosine, 1 = identical) of a synthetic film against a "
     "training film."),
    (r"^reid_verifier_auc", "The verifier's AUC on same- against different-patient pairs of held-out films; near "
     "0.5 the re-identification audit sees nothing."),
    (r"^mia_.*_auc_reference$", "The same attack's AUC against a reference generator of the same architecture that "
     "never saw the members: what distribution shift alone gives."),
    (r"^mia_bound_auc", "Largest AUC any membership test can reach against an (ε, δ)-DP training run."),
    (r"^mia_bound_tpr", "Largest TPR at that FPR allowed by (ε, δ)-DP: min(e^ε·FPR+δ, 1−e^−ε(1−δ−FPR))."),
    (r"^mia_.*_auc$", "Membership-inference ROC AUC, training (members) vs holdout (non-members); 0.5 = chance."),
    (r"^mia_.*_tpr_fpr", "Membership-inference true-positive rate at the stated false-positive rate."),
    (r"^dp_epsilon", "ε spent by the run (per hospital, for its privacy unit)."),
    (r"^dp_delta", "δ of the run's (ε, δ) guarantee."),
)


def definition(key: str) -> str:
    for pattern, text in DEFINITIONS:
        if re.search(pattern, key):
            return text
    return ""

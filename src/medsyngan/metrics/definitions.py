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

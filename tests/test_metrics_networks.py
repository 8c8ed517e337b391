"""Inception-v3 (FID) and LPIPS-VGG16: the published files' key names and shapes load, outputs have the right shape,
and weight files are found (or not) as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsyngan.rundir import sha256_file
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import inception, lpips, weights

# The conv layers of pt_inception-2015-12-05-6726825d.pth, written out from torchvision's Inception3 (aux logits off,
# 1008 classes) independently of our module: (name, in, out, kernel h, kernel w). Every one is conv (no bias) + BN.


def _a(p, cin, pool):
    return [(f"{p}.branch1x1", cin, 64, 1, 1), (f"{p}.branch5x5_1", cin, 48, 1, 1), (f"{p}.branch5x5_2", 48, 64, 5, 5),
            (f"{p}.branch3x3dbl_1", cin, 64, 1, 1), (f"{p}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{p}.branch3x3dbl_3", 96, 96, 3, 3), (f"{p}.branch_pool", cin, pool, 1, 1)]


def _c(p, c7):
    return [(f"{p}.branch1x1", 768, 192, 1, 1), (f"{p}.branch7x7_1", 768, c7, 1, 1), (f"{p}.branch7x7_2", c7, c7, 1, 7),
            (f"{p}.branch7x7_3", c7, 192, 7, 1), (f"{p}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{p}.branch7x7dbl_2", c7, c7, 7, 1), (f"{p}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{p}.branch7x7dbl_4", c7, c7, 7, 1), (f"{p}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{p}.branch_pool", 768, 192, 1, 1)]


def _e(p, cin):
    return [(f"{p}.branch1x1", cin, 320, 1, 1), (f"{p}.branch3x3_1", cin, 384, 1, 1),
            (f"{p}.branch3x3_2a", 384, 384, 1, 3), (f"{p}.branch3x3_2b", 384, 384, 3, 1),
            (f"{p}.branch3x3dbl_1", cin, 448, 1, 1), (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{p}.branch_pool", cin, 192, 1, 1)]


CONVS = (
    [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
     ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    + _a("Mixed_5b", 192, 32) + _a("Mixed_5c", 256, 64) + _a("Mixed_5d", 288, 64)
    + [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
       ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    + _c("Mixed_6b", 128) + _c("Mixed_6c", 160) + _c("Mixed_6d", 160) + _c("Mixed_6e", 192)
    + [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
       ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
       ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    + _e("Mixed_7b", 1280) + _e("Mixed_7c", 2048)
)
# torchvision publishes 27,161,264 parameters for inception_v3 with aux logits and 1000 classes; without the aux head
# (3,326,696) and with the FID graph's 1008 classes (+8·2048+8) the FID file holds 23,850,960.
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 + 8 * 2048 + 8


def standard_inception_state(seed: int = 0, with_counters: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, cin, cout, kh, kw in CONVS:
        state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=gen) * (2 / (cin * kh * kw)) ** 0.5
        state[f"{name}.bn.weight"] = torch.ones(cout)
        state[f"{name}.bn.bias"] = torch.randn(cout, generator=gen) * 0.1
        state[f"{name}.bn.running_mean"] = torch.zeros(cout)
        state[f"{name}.bn.running_var"] = torch.ones(cout)
        if with_counters:
            state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    return state


def test_hand_written_spec_is_the_published_file():
    state = standard_inception_state(with_counters=False)
    assert len(CONVS) == 94 and len(state) == 94 * 5 + 2
    params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var")))
    assert params == FID_INCEPTION_PARAMS == 23_850_960


@pytest.fixture(scope="module")
def standard_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    torch.save(standard_inception_state(with_counters=False), folder / inception.INCEPTION_WEIGHTS.filenames[0])
    return folder / inception.INCEPTION_WEIGHTS.filenames[0]


@pytest.mark.slow
def test_inception_loads_standard_keys_and_outputs_2048(standard_file, monkeypatch):
    monkeypatch.setenv("MEDSYNGAN_INCEPTION_WEIGHTS", str(standard_file.parent))  # a folder holding the file
    net = inception.load_inception()
    state = torch.load(standard_file, weights_only=True)
    ours = {k: tuple(v.shape) for k, v in inception.essential_keys(net.state_dict()).items()}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}
    torch.testing.assert_close(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    x = torch.rand(1, 3, inception.INPUT_SIZE, inception.INPUT_SIZE)
    with torch.no_grad():
        feats, logits = net(x), net.logits(x)
    assert feats.shape == (1, inception.FEATURE_DIM) and logits.shape == (1, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average pool of ReLU outputs


def test_torch_fidelity_file_name_with_counters_loads_from_hub_cache(standard_file, tmp_path, monkeypatch):
    """torch-fidelity's copy of the same weights, saved with BatchNorm counters, found in torch hub's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MEDSYNGAN_INCEPTION_WEIGHTS", raising=False)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    state = torch.load(standard_file, weights_only=True)
    state.update({f"{name}.bn.num_batches_tracked": torch.tensor(5) for name, *_ in CONVS})
    torch.save(state, hub / "weights-inception-2015-12-05-6726825d.pth")
    net = inception.load_inception()
    torch.testing.assert_close(net.fc.weight, state["fc.weight"])


def test_inception_rejects_a_foreign_state_dict(standard_file, tmp_path):
    state = torch.load(standard_file, weights_only=True)
    state.pop("fc.bias")
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(UserError, match="1 keys missing"):
        inception.load_inception(tmp_path / "x.pth")
    state = torch.load(standard_file, weights_only=True)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "y.pth")
    with pytest.raises(UserError, match="wrong shape"):
        inception.load_inception(tmp_path / "y.pth")


def test_missing_weights_offline_is_one_line_naming_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDSYNGAN_OFFLINE", "1")
    monkeypatch.delenv("MEDSYNGAN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(UserError) as err:
        inception.load_inception()
    msg = str(err.value)
    assert "\n" not in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and inception.INCEPTION_WEIGHTS.url in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "MEDSYNGAN_INCEPTION_WEIGHTS" in msg


def test_download_verifies_the_hash_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDSYNGAN_OFFLINE", raising=False)
    source = tmp_path / "published.bin"
    source.write_bytes(b"published weights")
    digest = sha256_file(source)
    good = weights.WeightFile("test", (f"w-{digest[:8]}.pth",), source.as_uri(), "MEDSYNGAN_TEST_W", digest[:8])
    path = weights.resolve(good)
    assert path.read_bytes() == b"published weights" and path.parent == weights.weights_cache_dir()
    bad = weights.WeightFile("test", ("w-00000000.pth",), source.as_uri(), "MEDSYNGAN_TEST_W", "00000000")
    with pytest.raises(UserError, match="SHA-256"):
        weights.resolve(bad)
    assert not (weights.weights_cache_dir() / "w-00000000.pth").exists()


def _standard_lpips_files(folder: Path) -> None:
    """vgg16-397923af.pth (features.* and classifier.* as torchvision publishes) and the LPIPS v0.1 heads."""
    gen = torch.Generator().manual_seed(0)
    vgg, cin, idx = {}, 3, 0
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            idx += 1
            continue
        vgg[f"features.{idx}.weight"] = torch.randn(item, cin, 3, 3, generator=gen) * (2 / (cin * 9)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(item)
        cin, idx = item, idx + 2
    for i, (a, b) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000))):
        vgg[f"classifier.{i}.weight"] = torch.zeros(b, 1)  # shape irrelevant here: LPIPS drops the classifier
        vgg[f"classifier.{i}.bias"] = torch.zeros(b)
    assert len([k for k in vgg if k.startswith("features.")]) == 26
    torch.save(vgg, folder / "vgg16-397923af.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, folder / "vgg.pth")


def test_lpips_loads_published_layout_and_measures_distance(tmp_path, monkeypatch):
    _standard_lpips_files(tmp_path)
    monkeypatch.setenv("MEDSYNGAN_VGG16_WEIGHTS", str(tmp_path / "vgg16-397923af.pth"))
    monkeypatch.setenv("MEDSYNGAN_LPIPS_WEIGHTS", str(tmp_path / "vgg.pth"))
    model = lpips.load_lpips()
    a = torch.rand(3, 3, 64, 64) * 2 - 1
    b = a.flip(-1)
    with torch.no_grad():
        d_same, d_diff = model(a, a), model(a, b)
    assert d_same.shape == (3,) and torch.allclose(d_same, torch.zeros(3))
    assert (d_diff > 0).all()


def test_lpips_missing_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDSYNGAN_OFFLINE", "1")
    monkeypatch.delenv("MEDSYNGAN_VGG16_WEIGHTS", raising=False)
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        lpips.load_lpips()

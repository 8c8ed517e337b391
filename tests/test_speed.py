"""Precision and layout choices: `train.amp = "auto"` follows a measured fp32-vs-bf16 probe cached per CPU model, torch
version and device; `train.channels_last`; DP-SGD keeps float32; the family benchmark's presets and widths."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medsyngan import runtime
from medsyngan.config import load_config
from medsyngan.training import step
from medsyngan.training.step import GANTrainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["run.device=cpu", "model.ngf=4", "model.ndf=4", "model.z_dim=8", "model.resolution=32", "data.size=32",
        "train.batch_size=4"]


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A fresh cache folder and no verdict remembered from earlier in the session."""
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "_verdicts", {})
    return tmp_path / runtime.PRECISION_FILE


def _measured(fp32: float, bf16: float, calls: list):
    def measure() -> tuple[float, float]:
        calls.append(1)
        return fp32, bf16

    return measure


@pytest.mark.parametrize("fp32, bf16, verdict", [(2.0, 1.0, True), (1.0, 1.0, False), (1.0, 3.0, False),
                                                 (1.1, 1.0, False)])
def test_the_probe_decides_and_is_measured_once_per_machine(probe_cache, monkeypatch, fp32, bf16, verdict):
    calls: list = []
    monkeypatch.setattr(runtime, "measure_bf16_speedup", _measured(fp32, bf16, calls))
    cpu = torch.device("cpu")
    assert runtime.bf16_pays(cpu) is verdict and runtime.bf16_pays(cpu) is verdict
    assert len(calls) == 1
    saved = json.loads(probe_cache.read_text())
    key = f"{runtime.cpu_model()} | torch {torch.__version__} | cpu | {runtime.PROBE_METHOD}"
    assert saved[key]["bf16"] is verdict and saved[key]["fp32_ms"] == fp32 * 1e3
    # Another process on the same machine reads the verdict instead of measuring again.
    monkeypatch.setattr(runtime, "_verdicts", {})
    assert runtime.bf16_pays(cpu) is verdict and len(calls) == 1


def test_another_torch_version_or_a_damaged_file_measures_again(probe_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(runtime, "measure_bf16_speedup", _measured(2.0, 1.0, calls))
    probe_cache.write_text(json.dumps({f"{runtime.cpu_model()} | torch 0.1 | cpu | {runtime.PROBE_METHOD}":
                                       {"bf16": False}}))
    assert runtime.bf16_pays(torch.device("cpu")) and len(calls) == 1
    assert len(json.loads(probe_cache.read_text())) == 2  # the other version's verdict is kept
    monkeypatch.setattr(runtime, "_verdicts", {})
    probe_cache.write_text("{not json")
    assert runtime.bf16_pays(torch.device("cpu")) and len(calls) == 2


def test_cuda_always_takes_bf16_without_measuring(probe_cache, monkeypatch):
    monkeypatch.setattr(runtime, "measure_bf16_speedup", lambda: pytest.fail("CUDA must not be probed"))
    assert runtime.bf16_pays(torch.device("cuda"))
    assert not probe_cache.exists()


def test_the_probe_times_both_precisions_on_one_thread_and_restores_the_threads(monkeypatch):
    threads, seen = torch.get_num_threads(), []
    original = runtime._conv_seconds

    def conv_seconds(dtype, reps=3):
        seen.append(torch.get_num_threads())
        return original(dtype, reps)

    monkeypatch.setattr(runtime, "_conv_seconds", conv_seconds)
    fp32, bf16 = runtime.measure_bf16_speedup(rounds=1)
    assert fp32 > 0 and bf16 > 0
    assert set(seen) == {1} and torch.get_num_threads() == threads


@pytest.mark.parametrize("pays", [True, False])
def test_auto_precision_follows_the_probe_and_explicit_settings_do_not(monkeypatch, pays):
    monkeypatch.setattr(step, "bf16_pays", lambda device: pays)
    assert (GANTrainer(load_config(None, TINY)).autocast_dtype == torch.bfloat16) is pays
    assert GANTrainer(load_config(None, [*TINY, "train.amp=off"])).autocast_dtype is None
    assert GANTrainer(load_config(None, [*TINY, "train.amp=bf16"])).autocast_dtype == torch.bfloat16


def test_auto_keeps_float32_on_a_cpu_for_families_that_measured_slower_in_bf16(monkeypatch):
    monkeypatch.setattr(step, "bf16_pays", lambda device: True)
    tiny_sg3 = load_config("stylegan3-64", ["run.device=cpu", "model.fmap_base=64", "model.fmap_max=8",
                                            "model.sg3_layers=4", "train.batch_size=4"])
    assert "stylegan3" in step.BF16_SLOWER_ON_CPU
    assert GANTrainer(tiny_sg3).autocast_dtype is None
    assert GANTrainer(load_config(None, TINY)).autocast_dtype == torch.bfloat16


def test_dp_sgd_trains_in_float32_whatever_the_probe_says(monkeypatch):
    from medsyngan.privacy.dp import enable_dp

    monkeypatch.setattr(step, "bf16_pays", lambda device: True)
    cfg = load_config(None, [*TINY, "model.dp_compatible=true", "privacy.dp=true", "privacy.unit=image"])
    trainer = GANTrainer(cfg)
    assert trainer.autocast_dtype == torch.bfloat16
    images = (torch.rand(40, 32, 32) * 255).to(torch.uint8).numpy()
    enable_dp(trainer, images, None, cfg.privacy, batch_size=4, planned_steps=10, seed=1)
    assert trainer.autocast_dtype is None


@pytest.mark.parametrize("setting, expected", [("on", True), ("off", False)])
def test_channels_last_setting(setting, expected):
    trainer = GANTrainer(load_config(None, [*TINY, f"train.channels_last={setting}"]))
    weight = next(p for p in trainer.D.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert trainer.channels_last is expected
    assert weight.is_contiguous(memory_format=torch.channels_last) is expected
    assert torch.isfinite(torch.tensor(list(trainer.train_step(lambda: torch.rand(4, 1, 32, 32)).values()))).all()


def test_channels_last_auto_is_on_for_cuda_and_the_measured_families_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for arch in ("dcgan", "progan", "stylegan2", "stylegan3"):
        assert step._use_channels_last(cuda, arch, "auto")
        assert step._use_channels_last(cpu, arch, "auto") is (arch in step.CHANNELS_LAST_ON_CPU)


def _benchmark(name: str = "bench_families"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_family_benchmark_finds_a_preset_for_every_family_and_size():
    bench = _benchmark()
    for arch in bench.families():
        for resolution in bench.RESOLUTIONS:
            preset, overrides = bench.family_preset(arch, resolution)
            cfg = load_config(preset, overrides + bench.dcgan_width(arch, resolution))
            assert (cfg.model.arch, cfg.model.resolution) == (arch, resolution)
    # DCGAN's width: the textbook 64-px DCGAN's channels at every resolution (512 at 4 px ... 64 at 32 px).
    from medsyngan.models.layers import channels

    assert [channels(r, 32 * 64, 512) for r in (4, 8, 16, 32)] == [512, 256, 128, 64]


def test_make_bench_runs_the_family_benchmark_and_skips_scripts_run_by_hand():
    run_all = _benchmark("run_all")
    found = {p.stem: p for p in run_all.discover(None)}
    assert callable(run_all.load(found["bench_families"]).run)
    assert not hasattr(run_all.load(found["bench_gpu"]), "run")  # needs CUDA: run by hand, skipped with a note


def test_the_family_benchmark_times_each_familys_cpu_preset_and_profiles_it():
    bench = _benchmark()
    assert bench.family_preset("stylegan3", 64) == ("stylegan3-64-fast", [])  # before NVlabs' width
    assert bench.family_preset("stylegan3", 128) == ("stylegan3-64-fast", ["model.resolution=128", "data.size=128"])
    assert bench.family_preset("progan", 128) == ("progan128-short", [])
    table = bench.profile("dcgan", 64, steps=1, rows=5)
    assert table.startswith("dcgan64 at 64 px") and "by operator and input shape" in table
    assert "aten::" in table and "Input Shapes" in table

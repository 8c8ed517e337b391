"""FedAvg / FedAdam arithmetic against hand computations on small tensors."""

import torch

from medsyngan.federated.aggregation import FedAdam, ServerOptimizer, accumulate, apply_mean_update, delta, mean_of


def weighted_mean(updates, weights):
    total = {}
    for update, weight in zip(updates, weights):
        accumulate(total, update, weight)
    return mean_of(total, sum(weights))


def test_fedavg_over_generator_and_discriminator_matches_hand_computation():
    global_state = {"G.w": torch.tensor([1.0, 2.0]), "D.w": torch.tensor([[0.0]]), "D.bn.n": torch.tensor(4)}
    local_a = {"G.w": torch.tensor([2.0, 2.0]), "D.w": torch.tensor([[1.0]]), "D.bn.n": torch.tensor(6)}
    local_b = {"G.w": torch.tensor([1.0, 5.0]), "D.w": torch.tensor([[-2.0]]), "D.bn.n": torch.tensor(8)}
    # Hospital a holds 30 images, b holds 10: weights 0.75 / 0.25.
    mean = weighted_mean([delta(local_a, global_state), delta(local_b, global_state)], [30, 10])
    new = apply_mean_update(global_state, mean)
    assert torch.allclose(new["G.w"], torch.tensor([0.75 * 2 + 0.25 * 1, 0.75 * 2 + 0.25 * 5]))
    assert torch.allclose(new["D.w"], torch.tensor([[0.75 * 1 + 0.25 * -2]]))
    assert new["D.bn.n"].dtype == torch.int64 and int(new["D.bn.n"]) == round(0.75 * 6 + 0.25 * 8)
    assert new["G.w"].dtype == torch.float32


def test_fedavg_equals_weighted_average_of_local_models():
    torch.manual_seed(0)
    g = {"x": torch.randn(5)}
    locals_ = [{"x": torch.randn(5)} for _ in range(3)]
    weights = [1.0, 2.0, 7.0]
    new = ServerOptimizer("fedavg", {"x"}).step(g, weighted_mean([delta(l, g) for l in locals_], weights))
    expected = sum(w * l["x"] for w, l in zip(weights, locals_)) / sum(weights)
    assert torch.allclose(new["x"], expected, atol=1e-6)


def test_fedadam_first_step_by_hand_and_state_round_trip():
    g = {"x": torch.tensor([0.0, 1.0])}
    d = {"x": torch.tensor([0.5, -0.25], dtype=torch.float64)}
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(g, d)
    m = 0.1 * d["x"]
    v = 0.01 * d["x"] ** 2
    assert torch.allclose(out["x"].double(), g["x"].double() + 0.1 * m / (v.sqrt() + 1e-3))
    clone = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(clone.step(out, d)["x"], opt.step(out, d)["x"])


def test_fedavgm_two_steps_by_hand_and_resume_from_state():
    g = {"x": torch.tensor([0.0, 1.0]), "n": torch.tensor(3)}
    d1 = {"x": torch.tensor([0.5, -0.25], dtype=torch.float64), "n": torch.tensor(2.0, dtype=torch.float64)}
    d2 = {"x": torch.tensor([0.1, 0.1], dtype=torch.float64), "n": torch.tensor(1.0, dtype=torch.float64)}
    opt = ServerOptimizer("fedavgm", {"x"}, server_lr=2.0, server_momentum=0.5)
    first = opt.step(g, d1)
    assert torch.allclose(first["x"], torch.tensor([1.0, 0.5]))  # v = Δ1, global + 2·v
    assert int(first["n"]) == 5  # integer buffers take the plain mean update, no momentum
    resumed = ServerOptimizer("fedavgm", {"x"}, server_lr=2.0, server_momentum=0.5)
    resumed.load_state_dict(opt.state_dict())
    second = opt.step(first, d2)
    # v = 0.5·Δ1 + Δ2 = [0.35, -0.025]; global + 2·v
    assert torch.allclose(second["x"], torch.tensor([1.7, 0.45]))
    assert torch.equal(resumed.step(first, d2)["x"], second["x"])


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg():
    torch.manual_seed(1)
    g, d = {"x": torch.randn(4)}, {"x": torch.randn(4, dtype=torch.float64)}
    fedavgm = ServerOptimizer("fedavgm", {"x"}, server_lr=1.0, server_momentum=0.0)
    assert torch.allclose(fedavgm.step(g, d)["x"], ServerOptimizer("fedavg", {"x"}).step(g, d)["x"])


def test_server_lr_zero_takes_the_strategys_default():
    assert ServerOptimizer("fedadam", {"x"}).inner.lr == 1e-2
    assert ServerOptimizer("fedavgm", {"x"}).inner.lr == 1.0
    assert ServerOptimizer("fedadam", {"x"}, server_lr=3e-3).inner.lr == 3e-3


def test_server_momentum_and_adam_leave_buffers_to_the_plain_mean():
    # A running variance that a velocity would overshoot below zero: buffers must take the mean update only.
    g = {"G.w": torch.tensor([1.0]), "G.bn.running_var": torch.tensor([0.5])}
    down = {"G.w": torch.tensor([-0.4], dtype=torch.float64), "G.bn.running_var": torch.tensor([-0.4], dtype=torch.float64)}
    for strategy in ("fedavgm", "fedadam"):
        opt = ServerOptimizer(strategy, {"G.w"}, server_lr=1.0, server_momentum=0.9)
        state = g
        for _ in range(3):
            state = opt.step(state, {k: v * 0.25 for k, v in down.items()})
        assert torch.allclose(state["G.bn.running_var"], torch.tensor([0.5 - 3 * 0.1]))
        assert set(opt.state_dict()) <= {f"{p}.G.w" for p in ("velocity", "m", "v")}
    # Positive control: a variance wrongly listed as a parameter is driven below zero.
    plain = ServerOptimizer("fedavgm", set(g), server_lr=1.0, server_momentum=0.9)
    assert float(plain.step(plain.step(g, down), down)["G.bn.running_var"]) < 0

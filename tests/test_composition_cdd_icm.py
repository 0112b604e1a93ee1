"""CDD-ICM's own pieces against hand computations: gated fusion (eq. 1), ICM loss (eq. 12), the cosine
schedule (eq. 4), the learned variance (eqs. 8-9) and the hybrid loss with its stop-gradient (eq. 11).

Run: python -m pytest tests/test_composition_cdd_icm.py -q
"""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def cdd(pack_module):
    return pack_module("nodes.algorithms.cdd_icm")


def test_gated_fusion_by_hand(cdd):
    """d = 1, u = 2, v = 0.5: x = [2, 0.5, 1, 1.5]; with W_g = [1, 0, 0, 0], b_g = -2: g = sigmoid(0) = 0.5;
    W_h = [0, 2, 0, 0], b_h = 0: h = gelu(1) = 0.841345; c = 0.5 * 0.841345 + 0.5 * 2."""
    fusion = cdd.GatedFusion(1)
    with torch.no_grad():
        fusion.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        fusion.gate.bias.fill_(-2.0)
        fusion.hidden.weight.copy_(torch.tensor([[0, 2.0, 0, 0]]))
        fusion.hidden.bias.zero_()
    c = fusion(torch.tensor([[2.0]]), torch.tensor([[0.5]]))
    gelu1 = 0.5 * 1 * (1 + math.erf(1 / math.sqrt(2)))
    assert c.item() == pytest.approx(0.5 * gelu1 + 0.5 * 2.0, abs=1e-6)
    # the product and difference terms enter: W_g on u*v and u-v
    with torch.no_grad():
        fusion.gate.weight.copy_(torch.tensor([[0, 0, 1.0, -1.0]]))
        fusion.gate.bias.zero_()
    g = 1 / (1 + math.exp(-(1.0 - 1.5)))
    assert fusion(torch.tensor([[2.0]]), torch.tensor([[0.5]])).item() == pytest.approx(g * gelu1 + (1 - g) * 2.0, abs=1e-6)


def test_icm_loss_by_hand(cdd):
    """Two pairs with cosines S = [[1, 0], [0.6, 0.8]] (c = [1,0], [0.6,0.8]; E(z) = [1,0], [0,1]), tau = 0.5:
    rows: -log softmax([2, 0])_0 and -log softmax([1.2, 1.6])_1; columns of S: [1, 0.6] and [0, 0.8]."""
    c = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    z = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # scale does not matter (cosine)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    rows = ((lse(2, 0) - 2) + (lse(1.2, 1.6) - 1.6)) / 2
    cols = ((lse(2, 1.2) - 2) + (lse(0, 1.6) - 1.6)) / 2
    assert cdd.icm_loss(c, z, 0.5).item() == pytest.approx(rows + cols, rel=1e-6)
    tau = cdd.Temperature()
    assert tau().item() == pytest.approx(math.exp(-1))
    loss = cdd.icm_loss(c, z, tau())
    loss.backward()
    assert tau.log_tau.grad is not None and tau.log_tau.grad.abs() > 0  # tau is trained


def test_cosine_schedule_by_hand(cdd):
    betas = cdd.cosine_betas(1000)
    f = lambda t: math.cos(((t / 1000 + 0.008) / 1.008) * math.pi / 2) ** 2  # noqa: E731
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-9)
    assert betas[500].item() == pytest.approx(1 - f(501) / f(500), rel=1e-9)
    assert betas[-1].item() == pytest.approx(0.999)  # clipped


def test_learned_variance_interpolates_between_beta_tilde_and_beta(cdd):
    s = cdd.Schedule(cdd.cosine_betas(1000))
    t = torch.tensor([10, 400])
    beta = s.betas[t]
    beta_tilde = beta * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    v = torch.ones(2, 1)
    assert torch.allclose(s.model_log_variance(-v.double(), t).exp().flatten(), beta_tilde)  # rho = 0
    assert torch.allclose(s.model_log_variance(v.double(), t).exp().flatten(), beta)  # rho = 1
    mid = s.model_log_variance(0 * v.double(), t).exp().flatten()  # rho = 0.5: geometric mean
    assert torch.allclose(mid, (beta * beta_tilde).sqrt())


def test_model_mean_matches_eq8_and_the_posterior_at_the_true_noise(cdd):
    s = cdd.Schedule(cdd.scaled_linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, generator=g).double(), torch.randn(3, 4, generator=g).double()
    t = torch.tensor([1, 200, 999])
    xt = s.q_sample(x0, t, noise)
    a, ab, b = s.alphas[t, None], s.alphas_cumprod[t, None], s.betas[t, None]
    assert torch.allclose(s.model_mean(xt, t, noise), (xt - b / (1 - ab).sqrt() * noise) / a.sqrt())
    # with the true eps the eq. 8 mean is the posterior mean
    assert torch.allclose(s.model_mean(xt, t, noise), s.q_posterior(x0, xt, t)[0], atol=1e-9)


def test_hybrid_loss_by_hand_and_its_stop_gradient(cdd):
    s = cdd.Schedule(cdd.cosine_betas(1000))
    g = torch.Generator().manual_seed(1)
    # float64: the t = 0 term divides by a variance of ~1e-5, where float32 rounding shows
    x0, noise = torch.randn(2, 2, 3, 3, generator=g).double(), torch.randn(2, 2, 3, 3, generator=g).double()
    t = torch.tensor([0, 300])
    xt = s.q_sample(x0, t, noise)
    out = torch.randn(2, 4, 3, 3, generator=g).double().requires_grad_(True)
    parts = cdd.hybrid_loss(s, x0, xt, t, noise, out, gamma=1.5)
    eps, v = out.detach().chunk(2, 1)
    mse = ((noise - eps) ** 2).flatten(1).mean(1)
    # by hand, sample 2 (t = 300): KL of posterior vs model; sample 1 (t = 0): Gaussian NLL of x0
    mean1, lv1 = s.q_posterior(x0[1:], xt[1:], t[1:])
    mean2 = (xt[1:] - s.betas[300] / (1 - s.alphas_cumprod[300]).sqrt() * eps[1:]) / s.alphas[300].sqrt()
    rho = (v[1:] + 1) / 2
    lv2 = rho * math.log(s.betas[300]) + (1 - rho) * s.posterior_log_variance_clipped[300]
    kl = 0.5 * (-1 + lv2 - lv1 + (lv1 - lv2).exp() + (mean1 - mean2) ** 2 * (-lv2).exp())
    mean0 = (xt[:1] - s.betas[0] / (1 - s.alphas_cumprod[0]).sqrt() * eps[:1]) / s.alphas[0].sqrt()
    lv0 = ((v[:1] + 1) / 2) * math.log(s.betas[0]) + (1 - (v[:1] + 1) / 2) * s.posterior_log_variance_clipped[0]
    nll = 0.5 * (math.log(2 * math.pi) + lv0 + (x0[:1] - mean0) ** 2 * (-lv0).exp())
    vlb = torch.stack([nll.mean(), kl.mean()]) / math.log(2)
    assert parts["mse"].item() == pytest.approx(mse.mean().item(), rel=1e-5)
    assert parts["vlb"].item() == pytest.approx(vlb.mean().item(), rel=1e-9)
    assert parts["loss"].item() == pytest.approx((mse + 1.5 * vlb).mean().item(), rel=1e-9)
    # stop-gradient: the eps half of the gradient is L_mse's alone; the v half comes from L_vlb only
    parts["loss"].backward()
    grad_eps, grad_v = out.grad.chunk(2, 1)
    expected_eps_grad = -2 * (noise - eps) / (2 * 2 * 9)  # d/d eps of mean over batch of mean over 18 dims
    assert torch.allclose(grad_eps, expected_eps_grad, atol=1e-6)
    assert grad_v.abs().sum() > 0


def test_guidance_formulas(cdd):
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    assert torch.allclose(cdd.cfg_eps(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    grad = torch.tensor([0.2, -0.4])
    assert torch.allclose(cdd.icm_guided_eps(cond, grad, 0.64, 2.0), cond - 0.6 * 2.0 * grad)
    c = torch.ones(1000, 3)
    dropped = cdd.drop_condition(c, 0.2, torch.Generator().manual_seed(0))
    share = float((dropped.sum(1) == 0).float().mean())
    assert 0.15 < share < 0.25 and set(dropped.unique().tolist()) <= {0.0, 1.0}


def test_ddim_recovers_x0_from_the_true_noise(cdd):
    """With eps_fn giving the exact noise of a known x0, deterministic DDIM lands on x0 in any number of
    steps (each step's x0 estimate is exact); ICM guidance with a zero gradient changes nothing."""
    s = cdd.Schedule(cdd.scaled_linear_betas(1000))
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    start = s.q_sample(x0, torch.tensor([999, 999]), noise)

    def true_eps(x, t):
        a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    assert cdd.ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    for steps in (1, 4, 25):
        assert torch.allclose(cdd.ddim_sample(s, true_eps, start, steps), x0, atol=1e-8)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.allclose(cdd.ddim_sample(s, true_eps, start, 4, zero, psi=2.0), x0, atol=1e-8)

"""CDD-ICM (Chao Wang et al., "A Diffusion-based Method for Multi-turn Compositional Image Generation",
arXiv 2304.02192) in plain torch: the parts that are the paper's own, each against its equation.

* `GatedFusion`                eq. 1: c = g * h + (1 - g) * u, with x = [u; v; u*v; u-v],
                               g = sigmoid(W_g x + b_g), h = gelu(W_h x + b_h)  (u: reference image, v: text)
* `icm_loss`                   eq. 12: symmetric InfoNCE over S_ij = cos(c_i, E(z_j)) / tau, softmax along
                               rows, tau trainable (stored as log tau, initialised to -1: tau = e^-1).
                               N-ICM is the same loss on the noisy encoder's embedding of x_t.
* `Schedule`                   the diffusion schedule: the paper's cosine one (eq. 4, Nichol & Dhariwal),
                               or any betas (the shapes-world composer keeps its UNet's SD1 schedule, see
                               below), with the posterior q(x_{t-1} | x_t, x_0).
* `Schedule.model_mean`        eq. 8: mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)
* `Schedule.model_log_variance` eq. 9: log Sigma = rho * log(beta_t / beta~_t) + log beta~_t, rho = (v + 1) / 2
                               from the network's extra output v in [-1, 1] (Improved DDPM's parameterisation)
* `hybrid_loss`                eq. 11: L_cdd = L_mse + gamma * L_vlb (gamma = 1.5), L_vlb (eq. 6) with the
                               gradient of L_vlb stopped into eps (it trains only rho); in bits per dimension.
* `cfg_eps` / `icm_guided_eps` inference: eq. 15 (eps^ = phi * eps(c) + (1 - phi) * eps(0), phi = 3) and
                               eq. 14's ICM guidance in DDIM's score form, eps' = eps - sqrt(1 - abar_t) * psi
                               * grad_x cos(c, E_noisy(x_t)) (ALGORITHMS.md: DDIM has no Sigma; the
                               similarity, not the loss, is ascended; at n = 1 InfoNCE is degenerate).

Nothing here knows about ComfyUI: the denoiser (ComfyUI's own UNetModel) and the encoders are built in
glue/composition.py and training/train_composer.py and only passed in.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ICM_TAU_INIT = math.exp(-1.0)
GAMMA_VLB = 1.5        # eq. 11
DELTA_ICM = 0.1        # stage-2 joint loss weight
COND_DROPOUT = 0.2     # lambda: condition dropped to 0 for classifier-free guidance
CFG_SCALE = 3.0        # phi, eq. 15
ICM_GUIDANCE = 2.0     # psi, eq. 14
BACKBONE_ACTIVITY = 1e-3  # eta: backbone lr = lr * eta


class GatedFusion(nn.Module):
    """Eq. 1 (from Wang, Yan & Wu, ACL 2018): fuses the reference-image representation u and the
    instruction representation v (both [B, d]) into the condition c [B, d]."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(4 * dim, dim)
        self.hidden = nn.Linear(4 * dim, dim)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = torch.cat([u, v, u * v, u - v], dim=-1)
        g = torch.sigmoid(self.gate(x))
        h = F.gelu(self.hidden(x))
        return g * h + (1 - g) * u


class Temperature(nn.Module):
    """The trainable temperature tau of eq. 12, kept positive as exp(log_tau)."""

    def __init__(self, init: float = ICM_TAU_INIT):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp()


def similarity_matrix(condition: torch.Tensor, target_embedding: torch.Tensor) -> torch.Tensor:
    """S_ij = cos(c_i, E(z_j))."""
    return F.normalize(condition, dim=-1) @ F.normalize(target_embedding, dim=-1).T


def icm_loss(condition: torch.Tensor, target_embedding: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. 12: (1/n) tr(-log softmax(S / tau)) + (1/n) tr(-log softmax(S^T / tau)), softmax along rows.
    The same function is N-ICM when target_embedding is the noisy encoder's embedding of x_t."""
    logits = similarity_matrix(condition, target_embedding) / tau
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


# ---------------------------------------------------------------------------------------------
# Schedules and the learned variance

def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Eq. 4 (Nichol & Dhariwal): abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2),
    beta_t = 1 - abar(t) / abar(t - 1), clipped at max_beta. float64."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((t / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def scaled_linear_betas(timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD1's schedule (ComfyUI's ModelSamplingDiscrete 'linear' = sqrt-linear squared), float64."""
    return torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2


class Schedule:
    """Per-step constants of a discrete diffusion process (index t = 0..T-1, t = 0 the least noisy),
    as Improved DDPM's GaussianDiffusion keeps them, in float64."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.double()
        self.timesteps = len(betas)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta~_0 is 0: its log is clipped to beta~_1 as Improved DDPM does
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 3: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    def model_mean(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 8."""
        return (xt - self._at(self.betas, t, xt) / (1 - self._at(self.alphas_cumprod, t, xt)).sqrt() * eps) \
            / self._at(self.alphas, t, xt).sqrt()

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 9 with rho = (v + 1) / 2: log Sigma = rho log beta_t + (1 - rho) log beta~_t (clipped)."""
        rho = (v + 1) / 2
        min_log = self._at(self.posterior_log_variance_clipped, t, v)
        max_log = self._at(torch.log(self.betas), t, v)
        return rho * max_log + (1 - rho) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x, mean, log_variance) -> torch.Tensor:
    """-log N(x; mean, e^log_variance), elementwise, in nats (the t = 1 term of eq. 6 for continuous
    latents: the pixel-space discretised decoder of Improved DDPM does not apply to a VAE latent)."""
    return 0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def vlb_terms(schedule: Schedule, x0, xt, t, eps, v) -> torch.Tensor:
    """L_vlb per sample (eq. 6), mean over dimensions, in bits: the KL to the posterior for t > 0,
    the decoder NLL at t = 0."""
    true_mean, true_log_var = schedule.q_posterior(x0, xt, t)
    mean = schedule.model_mean(xt, t, eps)
    log_var = schedule.model_log_variance(v, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    nll = gaussian_nll(x0, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def hybrid_loss(schedule: Schedule, x0, xt, t, noise, model_output: torch.Tensor,
                gamma: float = GAMMA_VLB) -> dict[str, torch.Tensor]:
    """Eq. 11: L_cdd = L_mse + gamma * L_vlb. model_output [B, 2C, ...] = (eps, v); L_vlb sees eps
    detached, so only v (the variance) learns from it. Returns {'loss', 'mse', 'vlb'}."""
    eps, v = model_output.chunk(2, dim=1)
    mse = ((noise - eps) ** 2).flatten(1).mean(1)
    vlb = vlb_terms(schedule, x0, xt, t, eps.detach(), v)
    return {"loss": (mse + gamma * vlb).mean(), "mse": mse.mean(), "vlb": vlb.mean()}


# ---------------------------------------------------------------------------------------------
# Inference

def cfg_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, phi: float = CFG_SCALE) -> torch.Tensor:
    """Eq. 15: phi * eps(c) + (1 - phi) * eps(0) (= uncond + phi (cond - uncond), ComfyUI's cfg = phi)."""
    return phi * eps_cond + (1 - phi) * eps_uncond


def icm_guided_eps(eps: torch.Tensor, similarity_grad: torch.Tensor, alpha_cumprod: torch.Tensor | float,
                   psi: float = ICM_GUIDANCE) -> torch.Tensor:
    """Eq. 14 in DDIM's score form: eps' = eps - sqrt(1 - abar_t) * psi * grad_{x_t} cos(c, E_noisy(x_t))."""
    return eps - torch.as_tensor(1 - alpha_cumprod, dtype=eps.dtype, device=eps.device).sqrt() * psi * similarity_grad


def drop_condition(condition: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free guidance training: c -> 0 with the given probability, per sample."""
    keep = (torch.rand(condition.shape[0], generator=generator, device="cpu") >= probability).to(condition.device)
    return condition * keep.view(-1, *([1] * (condition.ndim - 1))).to(condition.dtype)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` uniformly spaced training steps, from the noisiest (timesteps - 1) down to 0."""
    steps = max(1, min(int(steps), timesteps))
    return sorted({int(round(x)) for x in torch.linspace(timesteps - 1, 0, steps).tolist()}, reverse=True)


def ddim_sample(schedule: Schedule, eps_fn, noise: torch.Tensor, steps: int, similarity_grad_fn=None,
                psi: float = ICM_GUIDANCE, on_step=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over uniformly spaced steps, the paper's inference (Sec. 2.6):
    eps = eps_fn(x_t, t) (already classifier-free guided), then eq. 14's ICM guidance in score form when
    `similarity_grad_fn(x_t, t)` (grad of cos(c, E_noisy(x_t))) is given and psi > 0."""
    x = noise
    ts = ddim_timesteps(schedule.timesteps, steps)
    for i, t in enumerate(ts):
        abar = float(schedule.alphas_cumprod[t])
        abar_prev = float(schedule.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t_batch)
        if similarity_grad_fn is not None and psi > 0:
            eps = icm_guided_eps(eps, similarity_grad_fn(x, t_batch), abar, psi)
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
        if on_step is not None:
            on_step(i, len(ts))
    return x

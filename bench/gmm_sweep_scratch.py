import torch, time, sys, itertools
from dps.gmm import *
from dps.schedule import *
from dps.sampling import ddpm_sample, ddim_sample
from dps.guidance import DPSGuidance
from dps.noise import Gaussian
from dps.metrics import sliced_wasserstein
torch.set_num_threads(1)
def problem(dx, dy, seed):
    g = torch.Generator().manual_seed(seed)
    prior = GaussianMixture.mcg_diff(dx, g)
    A = random_problem(dx, dy, g)
    x = prior.sample(1, g)
    sy = float(torch.rand((), generator=g, dtype=torch.float64)) * float(torch.linalg.svdvals(A).max())
    sy = max(sy, 0.05)
    y = A @ x[0] + sy * torch.randn(dy, generator=g, dtype=torch.float64)
    return prior, A, y, sy
ac = alphas_cumprod_from_betas(linear_betas())
n = 500
steps_list = [int(s) for s in sys.argv[1].split(',')]
rules = sys.argv[2].split(',')
zetas = [float(z) for z in sys.argv[3].split(',')]
for dy in (1, 2, 4):
  for seed in range(3):
    prior, A, y, sy = problem(8, dy, seed)
    post = prior.posterior(A, y, sy).sample(n, torch.Generator().manual_seed(1))
    op = MatrixOperator(A)
    for steps in steps_list:
      base = None
      row = []
      for rule in rules:
        for z in zetas:
          gd = DPSGuidance(op, Gaussian(sy), as_image(y[None]), zeta=z, rule=rule, on_nonfinite="skip", explode_ratio=1e9)
          try:
            xs = ddim_sample(prior.eps_model(ac), (n, 8, 1, 1), steps=steps, eta=1.0, guidance=gd, clip_x0=False, generator=torch.Generator().manual_seed(0), x_T=None)
            sw = sliced_wasserstein(xs.flatten(1), post, 200, torch.Generator().manual_seed(0))
          except Exception as e:
            sw = float('nan')
          row.append(f"{rule[:5]}{z:g}:{sw:.2f}")
      xs = ddim_sample(prior.eps_model(ac), (n, 8, 1, 1), steps=steps, eta=1.0, clip_x0=False, generator=torch.Generator().manual_seed(0))
      uncond = sliced_wasserstein(xs.flatten(1), post, 200, torch.Generator().manual_seed(0))
      print(f"dy={dy} seed={seed} sy={sy:.2f} steps={steps} uncond={uncond:.2f} ", " ".join(row), flush=True)

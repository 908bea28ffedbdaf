"""The demo application on top of the guidance core (``dps``): embedded priors (a small pixel UNet and an SD1.x
latent UNet with TAESD), the held-out digits, the demo, restoring a user's image file, the command line
(``python -m dps``), image I/O, simple baselines, metrics and the Gaussian-mixture benchmark with its exact
posterior.

It imports the core through the core's public names; the core never imports this package. Training
(``python -m dps train``, module ``dps.app.train``) is not imported here, so that ``python -m dps.app.train``
also runs cleanly.
"""

from .baselines import candidates
from .data import heldout_digits, train_sample_digits
from .demo import DemoSettings, grid, load_setup, measure, run, sample
from .gmm import GaussianMixture, MatrixOperator, as_image, random_problem
from .imageio import ImageReadError, read_image, write_png
from .metrics import max_sliced_wasserstein, psnr, sliced_wasserstein, ssim
from .models import SmallUNet, TinyDecoder, TinyEncoder, load_taesd
from .prior import Prior, load_prior, save_prior
from .restore import RestoreRequest, restore_file
from .tasks import TASKS, make_operator
from .tuned import DEFAULT_STEPS, GUIDANCE, TUNING_OFFSET, guidance_for

__all__ = [
    "candidates", "heldout_digits", "train_sample_digits",
    "DemoSettings", "grid", "load_setup", "measure", "run", "sample",
    "GaussianMixture", "MatrixOperator", "as_image", "random_problem",
    "ImageReadError", "read_image", "write_png",
    "psnr", "ssim", "sliced_wasserstein", "max_sliced_wasserstein",
    "SmallUNet", "TinyDecoder", "TinyEncoder", "load_taesd",
    "Prior", "load_prior", "save_prior",
    "RestoreRequest", "restore_file",
    "TASKS", "make_operator",
    "GUIDANCE", "DEFAULT_STEPS", "TUNING_OFFSET", "guidance_for",
]

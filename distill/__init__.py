"""distill: few-step diffusion samplers by distribution-matching and adversarial distillation."""

__version__ = "0.1.0"

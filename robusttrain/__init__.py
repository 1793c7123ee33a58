"""robusttrain: train networks that stay accurate when their weights are perturbed.

The package minimizes the Gaussian-smoothed loss L_sigma(theta) = E_g[L(theta + sigma g)] with
zeroth-order (forward-pass only) gradient estimates, and evaluates any trained model under random
perturbations of its parameters.
"""

__version__ = "0.2.0"

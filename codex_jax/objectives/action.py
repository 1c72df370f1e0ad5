"""L_action: rectified-flow conditional flow matching on action chunks, and its Euler sampler.

x_tau = (1 - tau) eps + tau a carries noise eps (tau = 0) to the action chunk a (tau = 1) on a straight
line, whose velocity a - eps the head regresses given the observation latent and tau. Sampling
integrates dx/dtau = v(x, tau) from noise with `steps` Euler steps. Letters: C chunk slots, T horizon
(actions per chunk), A values per action.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from codex_jax.objectives.masked import masked_mean


def noisy_actions(actions_CTA: jax.Array, eps_CTA: jax.Array, tau_C: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_tau, velocity target a - eps)."""
  tau_C11 = tau_C[:, None, None]
  return (1.0 - tau_C11) * eps_CTA + tau_C11 * actions_CTA, actions_CTA - eps_CTA


def loss(velocity_CTA: jax.Array, target_CTA: jax.Array, valid_C: jax.Array) -> jax.Array:
  """Masked mean over chunks of the MSE (mean over T and A) of the predicted velocity."""
  err_C = jnp.mean(jnp.square(velocity_CTA.astype(jnp.float32) - target_CTA), axis=(1, 2))
  return masked_mean(err_C, valid_C)


def sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], eps_CTA: jax.Array, steps: int) -> jax.Array:
  """Euler integration of dx/dtau = velocity_fn(x, tau [C]) from x = eps at tau 0 to tau 1."""
  dt = 1.0 / steps

  def body(i, x_CTA):
    tau_C = jnp.full((x_CTA.shape[0],), i * dt, jnp.float32)
    return x_CTA + dt * velocity_fn(x_CTA, tau_C)

  return jax.lax.fori_loop(0, steps, body, eps_CTA.astype(jnp.float32))

"""Sampling from trained flows: tempered samples and latent interpolations, as images.

Both work on the package's flows: an nflows ``Flow`` (a :class:`lcma_ext.ContributionMultiscaleFlow`
or any other transform, with the standard normal or a learned prior such as the Flow-VAE's) and a
normflows ``MultiscaleFlow`` with ``DiagGaussian`` bases
(:func:`lcma_ext.normflows.build_multiscale_model`).

*Latent* means the base noise ``eps``, standard normal under the model: the output of the
nflows transform (every level's factored half and the last level's output, concatenated), or,
for normflows, each latent standardised by its base, ``(z_i - loc_i) / exp(log_scale_i)``.

Temperature ``T`` scales every latent: ``eps ~ N(0, T^2 I)``, so every level's factored half is
drawn at ``T`` as well. With Glow's conditional prior (``prior="conditional"``) the prior is an
affine map inside the flow, ``f = mu(k) + sigma(k) * eps_f`` given the kept half ``k``, that runs
after the deeper levels have produced ``k``; scaling ``eps_f`` by ``T`` therefore draws
``f = mu(k) + T sigma(k) eps``, Glow's tempered conditional, with nothing else to do. ``T = 0``
gives the image of zero noise (the mode of the latent, and of each conditional given its kept
half). A learned prior with ``sample_at_temperature`` (the Flow-VAE prior) draws its own tempered
noise.

Example:
    >>> from lcma_ext.data import LogitPreprocessing
    >>> from lcma_ext.models import build_flow, make_level_factory
    >>> from lcma_ext.pipeline import build_multiscale_transform
    >>> factory = make_level_factory("realnvp", "tiny")
    >>> transform = build_multiscale_transform(factory, (1, 8, 8), 3, prior="conditional")
    >>> flow = build_flow(transform, (1, 8, 8))
    >>> images = sample(flow, 4, 0.7, preprocessing=LogitPreprocessing(17), seed=0)
    >>> images.shape
    torch.Size([4, 1, 8, 8])
    >>> x = decode(flow, torch.randn(2, 64))  # two points of the flow's data space
    >>> interpolate(flow, x[:1], x[1:], 5, "spherical").shape
    torch.Size([1, 5, 1, 8, 8])

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018
    (temperature, ``split2d``).
    K. Shoemake. Animating rotation with quaternion curves. SIGGRAPH 1985 (slerp).
    T. White. Sampling Generative Networks. arXiv:1609.04468, 2016 (spherical latent paths).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor, nn

from lcma_ext.data.preprocess import LogitPreprocessing
from lcma_ext.flows import eval_mode, flow_dtype_device, flow_parts

if TYPE_CHECKING:
    import normflows as nf

__all__ = ["MODES", "decode", "encode", "interpolate", "sample", "sample_images"]

#: Interpolation paths of :func:`interpolate`.
MODES = ("linear", "spherical")
#: Below this ``sin`` of the angle between two latents, spherical interpolation is linear.
_PARALLEL = 1e-7


def _check_temperature(temperature: Any) -> float:
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"expected temperature as a finite number >= 0; got {temperature!r}")
    return float(temperature)


def _check_count(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"expected {name} as an integer >= {minimum}; got {value!r}")
    return value


def _is_normflows(flow: nn.Module) -> TypeGuard[nf.MultiscaleFlow]:
    import normflows as nf

    return isinstance(flow, nf.MultiscaleFlow)


def _gaussian_bases(model: nf.MultiscaleFlow) -> list[nf.distributions.DiagGaussian]:
    """The normflows model's bases, each a ``DiagGaussian`` (``loc``, ``log_scale``)."""
    import normflows as nf

    for index, base in enumerate(model.q0):
        if not isinstance(base, nf.distributions.DiagGaussian):
            raise TypeError(
                f"expected normflows DiagGaussian base distributions; got "
                f"{type(base).__name__} as q0[{index}]"
            )
    return list(model.q0)


def _finish(samples: Tensor, preprocessing: LogitPreprocessing | None) -> Tensor:
    """Model space to images in ``[0, 1]`` (with ``preprocessing``), on the CPU."""
    return (samples if preprocessing is None else preprocessing.to_unit(samples)).cpu()


def _nflows_sample(
    flow: nn.Module, num: int, temperature: float, generator: torch.Generator | None
) -> Tensor:
    dtype, device = flow_dtype_device(flow)
    transform, distribution, _ = flow_parts(flow)
    if hasattr(distribution, "sample_at_temperature"):  # a learned prior (Flow-VAE)
        noise = distribution.sample_at_temperature(num, temperature, generator=generator)
    else:
        shape = distribution._shape
        noise = temperature * torch.randn((num, *shape), generator=generator, dtype=dtype)
    return transform.inverse(noise.to(device))[0]


def _normflows_sample(
    model: nf.MultiscaleFlow, num: int, temperature: float, generator: torch.Generator | None
) -> Tensor:
    latents = []
    for base in _gaussian_bases(model):
        eps = torch.randn((num, *base.shape), generator=generator, dtype=base.loc.dtype)
        latents.append(base.loc + temperature * torch.exp(base.log_scale) * eps.to(base.loc))
    return model.forward_and_log_det(latents)[0]


@torch.no_grad()
def sample(
    flow: nn.Module,
    num: int,
    temperature: float = 1.0,
    *,
    preprocessing: LogitPreprocessing | None = None,
    seed: int | None = None,
) -> Tensor:
    """``num`` samples drawn at ``temperature``: every latent scaled by it (see the module).

    Args:
        flow: An nflows ``Flow`` or a normflows ``MultiscaleFlow`` with ``DiagGaussian`` bases.
        num: Number of samples.
        temperature: ``T >= 0``; 1 samples the model, 0 gives the image of zero noise.
        preprocessing: Undo it (``preprocessing.to_unit``): images in ``[0, 1]``; ``None``
            returns the flow's own data space.
        seed: Seed of a ``torch.Generator`` of its own (torch's global random state is left
            alone); ``None`` draws from the global random state.

    Returns:
        ``(num, *event_shape)`` on the CPU, drawn in eval mode (each module's mode is restored).

    Raises:
        ValueError: for ``num < 1`` or a negative or non-finite temperature.
        TypeError: for a normflows model whose bases are not ``DiagGaussian``.
    """
    num = _check_count(num, "num", 1)
    temperature = _check_temperature(temperature)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with eval_mode(flow):
        if _is_normflows(flow):
            samples = _normflows_sample(flow, num, temperature, generator)
        else:
            samples = _nflows_sample(flow, num, temperature, generator)
    return _finish(samples, preprocessing)


def sample_images(
    flow: nn.Module, preprocessing: LogitPreprocessing, num: int, temperature: float, seed: int
) -> Tensor:
    """``num`` images in ``[0, 1]`` at ``temperature``: :func:`sample` with ``preprocessing``.

    Returns:
        ``(num, C, H, W)`` on the CPU.
    """
    return sample(flow, num, temperature, preprocessing=preprocessing, seed=seed)


@torch.no_grad()
def encode(flow: nn.Module, x: Tensor) -> Tensor:
    """The latents ``eps`` of data ``x`` (the flow's input space), flattened per example.

    Shapes:
        x: ``(B, *event_shape)``; returns ``(B, D)``.
    """
    if _is_normflows(flow):
        latents, _ = flow.inverse_and_log_det(x)
        parts = [
            ((z - base.loc) * torch.exp(-base.log_scale)).flatten(1)
            for z, base in zip(latents, _gaussian_bases(flow), strict=True)
        ]
        return torch.cat(parts, 1)
    return flow_parts(flow).transform(x)[0].flatten(1)


@torch.no_grad()
def decode(flow: nn.Module, eps: Tensor) -> Tensor:
    """Data of latents ``eps`` (the inverse of :func:`encode`), in the flow's input space.

    Shapes:
        eps: ``(B, D)``; returns ``(B, *event_shape)``.
    """
    if _is_normflows(flow):
        bases = _gaussian_bases(flow)
        sizes = [math.prod(base.shape) for base in bases]
        chunks = torch.split(eps, sizes, dim=1)
        latents = [
            base.loc + torch.exp(base.log_scale) * chunk.reshape(-1, *base.shape)
            for chunk, base in zip(chunks, bases, strict=True)
        ]
        return flow.forward_and_log_det(latents)[0]
    transform, distribution, _ = flow_parts(flow)
    return transform.inverse(eps.reshape(-1, *distribution._shape))[0]


def _linear(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """``(1 - t) z0 + t z1``: ``(B, D)`` pairs, ``(S,)`` fractions -> ``(B, S, D)``."""
    t = t.view(1, -1, 1)
    return (1 - t) * z0.unsqueeze(1) + t * z1.unsqueeze(1)


def _spherical(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Slerp of the directions, linear interpolation of the norms: ``(B, S, D)``.

    Pairs that are (anti)parallel or include a zero latent are interpolated linearly.
    """
    n0, n1 = z0.norm(dim=1, keepdim=True), z1.norm(dim=1, keepdim=True)  # (B, 1)
    u0, u1 = z0 / n0.clamp_min(1e-30), z1 / n1.clamp_min(1e-30)
    omega = torch.arccos((u0 * u1).sum(1, keepdim=True).clamp(-1.0, 1.0))  # (B, 1)
    sin = torch.sin(omega)
    safe = sin.clamp_min(_PARALLEL)
    tt = t.view(1, -1)  # (1, S)
    a, b = torch.sin((1 - tt) * omega) / safe, torch.sin(tt * omega) / safe  # (B, S)
    direction = a.unsqueeze(2) * u0.unsqueeze(1) + b.unsqueeze(2) * u1.unsqueeze(1)
    norm = ((1 - tt) * n0 + tt * n1).unsqueeze(2)  # (B, S, 1)
    degenerate = ((sin < _PARALLEL) | (n0 == 0) | (n1 == 0)).view(-1, 1, 1)
    return torch.where(degenerate, _linear(z0, z1, t), norm * direction)


@torch.no_grad()
def interpolate(
    flow: nn.Module,
    x0: Tensor,
    x1: Tensor,
    steps: int,
    mode: str = "linear",
    *,
    preprocessing: LogitPreprocessing | None = None,
) -> Tensor:
    """``steps`` images from ``x0`` to ``x1`` along a path in latent space.

    ``"linear"``: ``eps(t) = (1 - t) eps0 + t eps1``. ``"spherical"``: the direction follows the
    great circle between ``eps0`` and ``eps1`` (slerp) and the norm goes linearly from
    ``|eps0|`` to ``|eps1|``, so no point falls into the low-norm interior that a linear path
    crosses (standard normal latents concentrate near the sphere of radius ``sqrt(D)``).
    ``t = k / (steps - 1)``; the first and last latents are ``eps0`` and ``eps1`` exactly, so
    the end images are the flow's reconstructions of ``x0`` and ``x1``.

    Args:
        flow: As in :func:`sample`.
        x0, x1: Pairs of data in the flow's input space (pre-processed, as the flow scores it).
        steps: Number of images per pair, ``>= 2``.
        mode: ``"linear"`` or ``"spherical"``.
        preprocessing: Undo it: images in ``[0, 1]``; ``None`` returns the flow's data space.

    Returns:
        ``(B, steps, *event_shape)`` on the CPU (eval mode; each module's mode is restored).

    Shapes:
        x0, x1: ``(B, *event_shape)``.

    Raises:
        ValueError: for ``x0`` and ``x1`` of different shapes or without a batch dimension,
            ``steps < 2`` or an unknown mode.
    """
    if tuple(x0.shape) != tuple(x1.shape) or x0.dim() < 2:
        raise ValueError(
            "expected x0 and x1 of the same shape (B, *event_shape); got "
            f"{tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    steps = _check_count(steps, "steps", 2)
    if mode not in MODES:
        raise ValueError(f"expected mode in {', '.join(MODES)}; got {mode!r}")
    with eval_mode(flow):
        z0, z1 = encode(flow, x0), encode(flow, x1)
        t = torch.linspace(0.0, 1.0, steps, dtype=z0.dtype, device=z0.device)
        path = _linear(z0, z1, t) if mode == "linear" else _spherical(z0, z1, t)
        path[:, 0], path[:, -1] = z0, z1
        images = decode(flow, path.reshape(-1, z0.shape[1]))
    batch = x0.shape[0]
    return _finish(images, preprocessing).reshape(batch, steps, *images.shape[1:])

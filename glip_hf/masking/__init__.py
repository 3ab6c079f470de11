"""Patch masking for GLIP / FLIP as pure tensor functions, plus the mask picture.

The rule follows the public GLIP reference code (arXiv 2403.15837), for an ``H x W`` patch grid:

* patch centres on ``linspace(-1, 1, W) x linspace(-1, 1, H)``;
* ``pdf`` = density of a 2-D normal N(0, diag(sigma, sigma)) at each centre (sigma is a *variance*);
* per image, ``score = U(0, 1) - (1 - pdf)``, fresh noise for every patch; random (FLIP) masking uses
  ``score = U(0, 1)``;
* keep the ``k = max(1, int(N * (1 - mask_ratio)))`` patches with the highest score.

Everything is drawn on the requested device: no numpy, no host sync.

Render the picture of the masks:

    python -m glip_hf.masking --out docs/masks.png
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..configuration_glip import MASK_STRATEGIES, MIN_MASK_SIGMA

GridSize = int | tuple[int, int]


def grid_hw(grid_size: GridSize) -> tuple[int, int]:
    """``grid_size`` as ``(H, W)``; an int means a square grid."""
    height, width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if height < 1 or width < 1:
        raise ValueError(f"grid_size must be positive, got {grid_size!r}.")
    return int(height), int(width)


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches kept out of ``num_patches`` at ``mask_ratio``: ``max(1, int(N * (1 - mask_ratio)))``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must satisfy 0 <= mask_ratio < 1, got {mask_ratio!r}.")
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def gaussian_prior(
    grid_size: GridSize,
    sigma: float = 0.2,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Density of N(0, diag(sigma, sigma)) at the patch centres of an ``(H, W)`` grid on ``[-1, 1]^2``.

    Returns:
        Tensor of shape ``(H, W)``. Not normalised over the grid: it is the pdf value, as in the reference code.
    """
    if not sigma >= MIN_MASK_SIGMA:  # also NaN
        raise ValueError(f"sigma must be at least {MIN_MASK_SIGMA} (the prior is computed in float32), got {sigma!r}.")
    height, width = grid_hw(grid_size)
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    squared_radius = ys[:, None] ** 2 + xs[None, :] ** 2  # (H, W)
    return torch.exp(-0.5 * squared_radius / sigma) / (2.0 * math.pi * sigma)


def masking_offset(
    grid_size: GridSize, strategy: str = "gaussian", sigma: float = 0.2, device: torch.device | str | None = None
) -> torch.Tensor:
    """The amount subtracted from the uniform noise of each patch before top-k: ``1 - pdf`` or zeros.

    Returns:
        Float tensor of shape ``(H * W,)`` in row-major patch order.
    """
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"strategy must be one of {MASK_STRATEGIES}, got {strategy!r}.")
    height, width = grid_hw(grid_size)
    if strategy == "random":
        return torch.zeros(height * width, device=device, dtype=torch.float32)
    return 1.0 - gaussian_prior((height, width), sigma, device=device).flatten()


def keep_indices_from_offset(
    batch_size: int, offset: torch.Tensor, num_keep: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Top-``num_keep`` of ``U(0, 1) - offset`` per row, drawn on ``offset``'s device.

    Args:
        offset: ``(N,)`` from [`masking_offset`].
    Returns:
        LongTensor ``(batch_size, num_keep)``, each row sorted ascending (kept patches in raster order).
    """
    noise = torch.rand(batch_size, offset.shape[0], device=offset.device, generator=generator)  # (B, N)
    scores = noise - offset.to(noise.dtype)
    return scores.topk(num_keep, dim=-1).indices.sort(dim=-1).values


def gather_patches(pixel_values: torch.Tensor, keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The kept ``p x p`` patches of each image, flattened as a patch convolution's weight is (channel, row, column).

    Reads only the kept patches: the image is indexed through a strided view, no copy of all its patches is made.

    Args:
        pixel_values: ``(B, C, H, W)``; rows and columns beyond the last whole patch are ignored.
        keep: ``(B, k)`` indices into the row-major patch grid (from [`keep_indices_from_offset`]).
    Returns:
        ``(B, k, C * p * p)``.
    """
    batch, _, height, width = pixel_values.shape
    p = patch_size
    rows, cols = height // p, width // p
    grid = pixel_values[:, :, : rows * p, : cols * p].unflatten(3, (cols, p)).unflatten(2, (rows, p))
    grid = grid.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p), a view
    images = torch.arange(batch, device=keep.device).unsqueeze(1)  # (B, 1)
    return grid[images, keep // cols, keep % cols].flatten(2)  # (B, k, C * p * p)


def sample_keep_indices(
    batch_size: int,
    grid_size: GridSize,
    mask_ratio: float,
    strategy: str = "gaussian",
    sigma: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices of the patches to keep, per image.

    Args:
        batch_size: number of images B.
        grid_size: patch grid, an int (square) or ``(H, W)``.
        mask_ratio: fraction dropped, ``0 <= mask_ratio < 1``.
        strategy: ``"gaussian"`` (GLIP) or ``"random"`` (FLIP).
        sigma: GLIP's sigma (covariance diagonal, not a standard deviation).
        generator: optional ``torch.Generator`` for reproducible draws; it must live on ``device``.
        device: where to draw; defaults to the generator's device, else the CPU.
    Returns:
        LongTensor ``(B, k)`` with ``k = max(1, int(H * W * (1 - mask_ratio)))``: indices into the row-major
        patch grid, sorted ascending within each row.
    """
    height, width = grid_hw(grid_size)
    if device is None and generator is not None:
        device = generator.device
    offset = masking_offset((height, width), strategy, sigma, device=device)
    return keep_indices_from_offset(batch_size, offset, num_kept_patches(height * width, mask_ratio), generator)


def keep_frequency(
    grid_size: GridSize,
    mask_ratio: float,
    strategy: str = "gaussian",
    sigma: float = 0.2,
    num_samples: int = 4096,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte-Carlo estimate of how often each patch is kept.

    Returns:
        Float tensor ``(H, W)`` with values in ``[0, 1]``; it sums to ``k`` (patches kept per image).
    """
    height, width = grid_hw(grid_size)
    keep = sample_keep_indices(num_samples, (height, width), mask_ratio, strategy, sigma, generator=generator)
    counts = torch.bincount(keep.flatten(), minlength=height * width).to(torch.float32)
    return (counts / num_samples).view(height, width)


def render_mask_figure(
    image: torch.Tensor,
    out: str | Path,
    patch_size: int = 16,
    mask_ratio: float = 0.75,
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.8),
    num_samples: int = 4096,
    seed: int = 0,
) -> Path:
    """Draw one image under random masking and Gaussian masking at each sigma, with keep-frequency heat maps.

    Args:
        image: float tensor ``(3, H, W)`` in ``[0, 1]``; H and W multiples of ``patch_size``.
    Returns:
        The path written: ``out``, with ``.png`` added when it has no suffix (its suffix picks the format).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, height, width = image.shape
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size must be between 1 and the image side {min(height, width)}, got {patch_size}.")
    if num_samples < 1:
        raise ValueError(f"num_samples (draws per keep-frequency map) must be at least 1, got {num_samples}.")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the picture to write, e.g. {out / 'masks.png'}.")
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib writes for a name without a suffix
    for sigma in sigmas:
        gaussian_prior(1, sigma)  # a bad sigma or mask_ratio is an error before the picture is drawn
    num_kept_patches(1, mask_ratio)
    grid = (height // patch_size, width // patch_size)
    image = image[:, : grid[0] * patch_size, : grid[1] * patch_size]  # the patch grid's pixels: the model sees no more
    columns = [("random", 0.2, "random (FLIP)")] + [("gaussian", s, f"Gaussian, sigma={s}") for s in sigmas]
    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 6.6), squeeze=False)
    for col, (strategy, sigma, title) in enumerate(columns):
        keep = sample_keep_indices(1, grid, mask_ratio, strategy, sigma, generator=generator)[0]
        patch_mask = torch.zeros(grid[0] * grid[1])
        patch_mask[keep] = 1.0
        pixel_mask = patch_mask.view(grid).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
        shown = image * pixel_mask + 0.5 * (1 - pixel_mask)  # dropped patches drawn grey
        axes[0, col].imshow(shown.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, col].set_title(f"{title}\n{keep.numel()}/{patch_mask.numel()} patches kept", fontsize=10)
        freq = keep_frequency(grid, mask_ratio, strategy, sigma, num_samples, generator=generator)
        heat = axes[1, col].imshow(freq.numpy(), vmin=0.0, vmax=1.0, cmap="magma")
        axes[1, col].set_title("keep frequency", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(heat, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle(f"Patch masking at mask_ratio={mask_ratio} (arXiv 2403.15837)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out

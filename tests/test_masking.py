"""Masking functions: counts, reproducibility, devices and the keep-frequency statistics of the reference rule."""

import math

import numpy as np
import pytest
import torch

from glip_hf.masking import (
    gather_patches,
    gaussian_prior,
    keep_frequency,
    num_kept_patches,
    render_mask_figure,
    sample_keep_indices,
)


@pytest.mark.parametrize("ratio, expected", [(0.0, 196), (0.5, 98), (0.75, 49), (0.918, 16), (0.999, 1)])
def test_exact_kept_counts(ratio, expected):
    assert num_kept_patches(196, ratio) == expected
    keep = sample_keep_indices(4, 14, ratio)
    assert keep.shape == (4, expected) and keep.dtype == torch.long


def test_indices_are_distinct_sorted_and_in_range():
    keep = sample_keep_indices(8, (5, 7), 0.6, strategy="gaussian", generator=torch.Generator().manual_seed(1))
    assert keep.min() >= 0 and keep.max() < 35
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)
    assert torch.equal(keep, keep.sort(dim=-1).values)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_patches_reads_the_kept_patches_in_convolution_order(channels_last):
    """Each gathered row is patch (r, c) of its image, flattened (channel, row, column) like a Conv2d weight; a
    ragged border (H, W not multiples of p) is ignored; any memory layout of the input."""
    p, rows, cols = 4, 3, 5
    pixels = torch.arange(2 * 3 * (rows * p + 2) * (cols * p + 3), dtype=torch.float64)
    pixels = pixels.reshape(2, 3, rows * p + 2, cols * p + 3)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    keep = sample_keep_indices(2, (rows, cols), 0.6, generator=torch.Generator().manual_seed(0))  # (2, 6)
    gathered = gather_patches(pixels, keep, p)
    assert gathered.shape == (2, keep.shape[1], 3 * p * p)
    for b in range(2):
        for j, index in enumerate(keep[b].tolist()):
            r, c = divmod(index, cols)
            expected = pixels[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1)
            assert torch.equal(gathered[b, j], expected)


def test_generator_reproducibility():
    a = sample_keep_indices(6, 14, 0.75, generator=torch.Generator().manual_seed(7))
    b = sample_keep_indices(6, 14, 0.75, generator=torch.Generator().manual_seed(7))
    c = sample_keep_indices(6, 14, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_meta_device_gives_shapes_without_data():
    keep = sample_keep_indices(3, (4, 6), 0.5, device="meta")
    assert keep.device.type == "meta" and keep.shape == (3, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_stay_on_device():
    keep = sample_keep_indices(3, 14, 0.5, device="cuda")
    assert keep.device.type == "cuda"


def reference_keep_frequency(height, width, ratio, sigma, samples, seed, strategy="gaussian"):
    """An independent numpy re-implementation of the reference rule (DESIGN.md), tallied per patch."""
    xs, ys = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    cov = np.array([[sigma, 0.0], [0.0, sigma]])
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    density = np.exp(-0.5 * np.einsum("ni,ij,nj->n", points, np.linalg.inv(cov), points))
    density /= 2 * math.pi * math.sqrt(np.linalg.det(cov))
    rng = np.random.default_rng(seed)
    k = max(1, int(height * width * (1 - ratio)))
    offset = (1 - density) if strategy == "gaussian" else 0.0
    scores = rng.random((samples, height * width)) - offset
    kept = np.argsort(-scores, axis=1)[:, :k]
    return np.bincount(kept.ravel(), minlength=height * width).reshape(height, width) / samples


SAMPLES = 20000
# Each frequency is a Bernoulli mean over SAMPLES draws: std <= 0.5 / sqrt(SAMPLES) = 0.0035 per estimate, so the
# difference of two independent estimates has std <= 0.005; 0.025 is 5 standard deviations.
TOL = 0.025


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.8])
def test_gaussian_keep_frequency_matches_reference_rule(sigma):
    ours = keep_frequency((6, 9), 0.75, "gaussian", sigma, SAMPLES, torch.Generator().manual_seed(0)).numpy()
    reference = reference_keep_frequency(6, 9, 0.75, sigma, SAMPLES, seed=1)
    assert np.abs(ours - reference).max() < TOL
    # The test can fail: reading sigma as a standard deviation (the classic misreading) is detected.
    misread = reference_keep_frequency(6, 9, 0.75, sigma**2, SAMPLES, seed=2)
    assert np.abs(ours - misread).max() > TOL


def test_random_keep_frequency_is_uniform():
    freq = keep_frequency((6, 9), 0.75, "random", num_samples=SAMPLES, generator=torch.Generator().manual_seed(0))
    k = num_kept_patches(54, 0.75)
    assert torch.allclose(freq, torch.full_like(freq, k / 54), atol=TOL)


def test_centre_kept_more_than_corners_and_monotone_in_sigma():
    centres, corners = [], []
    for sigma in (0.1, 0.2, 0.8):
        freq = keep_frequency(14, 0.75, "gaussian", sigma, 8000, torch.Generator().manual_seed(3))
        centre, corner = freq[6:8, 6:8].mean().item(), freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean().item()
        assert centre > corner + 0.1  # even the flattest prior (sigma=0.8) favours the centre by ~0.14
        centres.append(centre)
        corners.append(corner)
    assert centres[0] > centres[1] > centres[2]
    # Corners are not monotone between 0.1 and 0.2 (the saturated centre frees slots), but the flat prior wins.
    assert corners[2] > max(corners[0], corners[1])


def test_non_square_grid_prior_is_centred_and_symmetric():
    prior = gaussian_prior((3, 5), 0.2)
    assert prior.shape == (3, 5)
    assert prior.argmax().item() == 7  # row 1, column 2: the centre of a 3 x 5 grid
    assert torch.allclose(prior, prior.flip(0)) and torch.allclose(prior, prior.flip(1))
    assert prior[1, 2].item() == pytest.approx(1 / (2 * math.pi * 0.2))
    freq = keep_frequency((3, 5), 0.6, "gaussian", 0.2, 8000, torch.Generator().manual_seed(0))
    assert freq.sum().item() == pytest.approx(num_kept_patches(15, 0.6))
    assert freq[1, 2] > freq[0, 0]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_keep_indices(2, 14, 1.0)
    with pytest.raises(ValueError, match="strategy"):
        sample_keep_indices(2, 14, 0.5, strategy="uniform")
    with pytest.raises(ValueError, match="sigma"):
        gaussian_prior(14, 0.0)
    for sigma in (1e-300, 1e-40, float("nan")):  # 0 or subnormal in float32: the prior was all NaN, one mask for all
        with pytest.raises(ValueError, match="sigma must be at least"):
            gaussian_prior(14, sigma)


def test_the_smallest_sigma_allowed_still_draws_a_mask_per_image():
    keep = sample_keep_indices(64, 14, 0.75, sigma=1.2e-38, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in keep}) > 1  # the prior underflows to 0 everywhere: uniform draws


def test_mask_figure_renders(tmp_path):
    image = torch.rand(3, 64, 64)
    path = render_mask_figure(image, tmp_path / "masks.png", patch_size=8, num_samples=64)
    assert path.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(path).size[0] > 400


def test_mask_figure_of_an_image_not_a_multiple_of_the_patch(tmp_path, capsys):
    """The model ignores the pixels beyond the patch grid (CLIP accepts such sizes, and --init_from trains them); the
    picture showed them and failed to multiply a 16 px mask with an 18 px image."""
    path = render_mask_figure(torch.rand(3, 18, 18), tmp_path / "masks.png", patch_size=4, num_samples=8)
    assert path.is_file()
    code, out, _ = _mask_cli(capsys, "--image_size", "18", "--patch_size", "4", "--out", str(tmp_path / "cli.png"))
    assert code == 0 and (tmp_path / "cli.png").is_file(), out


def _mask_cli(capsys, *flags: str) -> tuple[int, str, str]:
    from glip_hf.masking.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["--image_size", "32", "--patch_size", "8", "--num_samples", "16", *flags])  # the last value wins
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_mask_picture_cli_says_the_file_it_wrote(tmp_path, capsys):
    code, out, _ = _mask_cli(capsys, "--out", str(tmp_path / "masks"))  # no suffix: matplotlib writes masks.png
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'masks.png'}" and (tmp_path / "masks.png").is_file()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--patch_size", "0"], "patch_size"),
        (["--patch_size", "64"], "patch_size"),
        (["--num_samples", "0"], "num_samples"),
        (["--mask_ratio", "1.5"], "mask_ratio"),
        (["--sigmas", "0"], "sigma"),
        (["--image", "no-such-image.png"], "no-such-image.png"),
    ],
)
def test_mask_picture_cli_bad_values_are_one_line_errors(tmp_path, capsys, flags, field):
    code, out, err = _mask_cli(capsys, "--out", str(tmp_path / "m.png"), *flags)
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_mask_picture_cli_refuses_a_folder_as_out(tmp_path, capsys):
    code, _, err = _mask_cli(capsys, "--out", str(tmp_path))
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1, err
    assert not tmp_path.with_suffix(".png").exists()

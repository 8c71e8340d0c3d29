"""augment.py: every level keeps films in [0, 1], is reproducible from its generator, never mirrors
a film, and the acquisition level changes contrast, sharpness and borders as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.augment import LEVELS, _acquisition, augment_batch, mixup


@pytest.fixture(scope="module")
def films(real_records) -> torch.Tensor:
    """Eight real films at 128 px as (8, 1, 128, 128) floats in [0, 1]."""
    paths = [r.path for r in real_records[:4]] + [r.path for r in real_records[-4:]]
    arr = np.stack([np.asarray(Image.open(p).convert("L").resize((128, 128))) for p in paths])
    return torch.from_numpy(arr).float().div(255.0).unsqueeze(1)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_level_keeps_shape_range_and_is_reproducible(films, level):
    a = augment_batch(films, level, torch.Generator().manual_seed(3))
    b = augment_batch(films, level, torch.Generator().manual_seed(3))
    assert a.shape == films.shape
    assert torch.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    if level == "none":
        assert torch.equal(a, films)
    else:
        assert not torch.equal(a, augment_batch(films, level, torch.Generator().manual_seed(4)))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_no_level_mirrors_a_film(films):
    """An augmented film stays closer to the original than to its left-right mirror (the heart stays left)."""
    for level in ("light", "strong", "acquisition"):
        out = augment_batch(films, level, torch.Generator().manual_seed(0))
        for orig, aug in zip(films, out):
            assert _corr(aug, orig) > _corr(aug, orig.flip(-1)), level


def test_acquisition_level_varies_contrast_sharpness_and_adds_borders_or_markers(films):
    batch = films.repeat(8, 1, 1, 1)  # 64 films: every random effect shows up
    out = augment_batch(batch, "acquisition", torch.Generator().manual_seed(1))
    strong = augment_batch(batch, "strong", torch.Generator().manual_seed(1))

    def sharpness(x):  # mean absolute Laplacian per film
        lap = x[:, :, 1:-1, 1:-1] * 4 - x[:, :, :-2, 1:-1] - x[:, :, 2:, 1:-1] - x[:, :, 1:-1, :-2] - x[:, :, 1:-1, 2:]
        return lap.abs().mean(dim=(1, 2, 3))

    ratio = sharpness(out) / sharpness(batch)
    assert ratio.min() < 0.7 and ratio.max() > 1.3  # some films blurred, some sharpened
    # gamma and window spread the mean brightness more than brightness/contrast alone
    assert out.mean(dim=(1, 2, 3)).std() > 0.9 * strong.mean(dim=(1, 2, 3)).std()
    assert "gamma" in LEVELS["acquisition"] and "gamma" not in LEVELS["strong"]


def test_acquisition_markers_and_borders_hit_a_share_of_the_films(films):
    batch = films.repeat(8, 1, 1, 1)
    params = {**LEVELS["acquisition"], "border": 0.0}
    out = _acquisition(batch, params, torch.Generator().manual_seed(2))  # markers are drawn last, exactly 0.95
    marked = ((out == 0.95).flatten(1).sum(1) >= 4).float().mean()
    assert 0.1 < marked < 0.6  # probability 0.3
    dark = _acquisition(batch, {**params, "marker": 0.0, "border": 1.0}, torch.Generator().manual_seed(2))
    edge = torch.cat([dark[:, :, :2].flatten(1), dark[:, :, -2:].flatten(1)], 1)
    plain = _acquisition(batch, {**params, "marker": 0.0}, torch.Generator().manual_seed(2))
    plain_edge = torch.cat([plain[:, :, :2].flatten(1), plain[:, :, -2:].flatten(1)], 1)
    assert edge.mean() < 0.8 * plain_edge.mean()  # collimation bands darken the edges


def _extent_ratio(film: torch.Tensor) -> float:
    """Width over height of the bright blob in the centre of a (1, S, S) film (second moments)."""
    s = film.shape[-1]
    c = film[0, s // 5: s - s // 5, s // 5: s - s // 5] > 0.5
    rows, cols = torch.nonzero(c, as_tuple=True)
    return float(cols.float().std() / rows.float().std())


def test_aspect_level_changes_width_to_height_and_acquisition_does_not():
    """``acquisition_aspect`` squeezes or widens the content (up to 1.5x either way); the other
    levels scale both axes alike, so a round blob stays round under them."""
    s = 96
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = (((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2) < (0.18 * s) ** 2).float()
    films = disk.expand(64, 1, s, s).clone()
    plain = [_extent_ratio(f) for f in augment_batch(films, "acquisition", torch.Generator().manual_seed(0))]
    aspect = [_extent_ratio(f) for f in augment_batch(films, "acquisition_aspect", torch.Generator().manual_seed(0))]
    assert max(abs(np.log(r)) for r in plain) < 0.08
    assert min(aspect) < 0.85 and max(aspect) > 1.18
    assert max(abs(np.log(r)) for r in aspect) < np.log(1.5) + 0.08


def test_mixup_blends_each_film_mostly_with_itself_and_is_reproducible(films):
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    mixed, partner, lam = mixup(films, target, 0.2, np.random.default_rng(5))
    again, partner2, lam2 = mixup(films, target, 0.2, np.random.default_rng(5))
    assert lam == lam2 and torch.equal(mixed, again) and torch.equal(partner, partner2)
    assert 0.5 <= lam <= 1.0
    # the partner of film i is the one whose target it got: mixed = lam * own + (1 - lam) * partner
    for i in range(8):
        j = next(k for k in range(8) if torch.allclose(mixed[i], lam * films[i] + (1 - lam) * films[k], atol=1e-6))
        assert partner[i] == target[j]
    assert sorted(partner.tolist()) == sorted(target.tolist())  # a permutation of the batch
    lams = [mixup(films, target, 0.2, np.random.default_rng(s))[2] for s in range(200)]
    assert np.mean(lams) > 0.8  # Beta(0.2, 0.2) folded: most mixes are light

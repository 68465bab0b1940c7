"""Augmentations, index batches, encoder models and probes of the contrastive reproduction."""

import numpy as np
import pytest
import torch

from optfm.contrastive.augment import CanvasAugment, TwoViewDataset, index_batches, two_views
from optfm.contrastive.evaluation import encode, knn_accuracy, linear_probe_accuracy
from optfm.contrastive.models import ContrastiveModel, MLPEncoder, Projector
from optfm.data.digits import make_digits_canvas

OFF = dict(rotation=0.0, scale=(1.0, 1.0), shift=0.0, brightness=(1.0, 1.0), noise_std=0.0,
           cutout=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def canvas():
    images, labels, _ = make_digits_canvas(random_state=0)
    return torch.from_numpy(images[:256]).unsqueeze(1), torch.from_numpy(labels[:256])


# --- augmentation -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 1, 12, 12), (16, 144)])
def test_augment_keeps_shape_dtype_and_does_not_modify_input(shape):
    x = torch.rand(shape)
    x0 = x.clone()
    out = CanvasAugment()(x, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, x0)
    assert torch.isfinite(out).all()
    out64 = CanvasAugment()(x.double(), gen())
    assert out64.dtype == torch.float64


def test_augment_is_seeded_and_changes_images(canvas):
    x, _ = canvas
    aug = CanvasAugment()
    a, b = aug(x, gen(3)), aug(x, gen(3))
    assert torch.equal(a, b)
    c = aug(x, gen(4))
    assert not torch.allclose(a, c)
    assert (a - x).abs().flatten(1).amax(1).min() > 1e-3  # every image changed
    v1, v2 = two_views(x, aug, gen(5))
    assert not torch.allclose(v1, v2)


def test_all_off_is_identity(canvas):
    x, _ = canvas
    assert torch.equal(CanvasAugment(**OFF)(x, gen()), x)


def test_near_identity_affine_stays_close_to_input(canvas):
    # a near-zero rotation goes through affine_grid/grid_sample and stays close to the input
    x, _ = canvas
    out = CanvasAugment(**{**OFF, "rotation": 1e-6})(x, gen())
    assert torch.allclose(out, x, atol=1e-4)


def test_shift_moves_mass_in_both_directions_only_small():
    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 5:7, 5:7] = 1.0
    out = CanvasAugment(**{**OFF, "shift": 2.0})(x, gen())
    cols = torch.arange(12.0)
    com = (out.sum(2).squeeze(1) * cols).sum(1) / out.sum((1, 2, 3))
    assert (com - 5.5).abs().max() <= 2.0 + 1e-4
    assert com.std() > 0.3


def test_no_horizontal_flip():
    # mass in the left third stays in the left half under the default augmentation
    x = torch.zeros(256, 1, 12, 12)
    x[:, :, 3:9, 1:4] = 1.0
    out = CanvasAugment(noise_std=0.0, cutout=0)(x, gen())
    left, right = out[..., :6].sum((1, 2, 3)), out[..., 6:].sum((1, 2, 3))
    assert (left > 5 * right).all()
    # and a rotation of at most 15 degrees keeps a vertical bar's orientation (no vertical flip)
    y = torch.zeros(256, 1, 12, 12)
    y[:, :, 1:4, 3:9] = 1.0
    out = CanvasAugment(noise_std=0.0, cutout=0)(y, gen(1))
    assert (out[:, :, :6].sum((1, 2, 3)) > 5 * out[:, :, 6:].sum((1, 2, 3))).all()


def test_cutout_forced_zeroes_one_patch():
    x = torch.ones(32, 1, 12, 12)
    out = CanvasAugment(**{**OFF, "cutout": 2, "cutout_p": 1.0})(x, gen())
    zeros = out == 0
    assert (zeros.sum((1, 2, 3)) == 4).all()
    for img in zeros[:, 0]:
        r, c = torch.nonzero(img, as_tuple=True)
        assert r.max() - r.min() == 1 and c.max() - c.min() == 1
    none = CanvasAugment(**{**OFF, "cutout": 2, "cutout_p": 0.0})(x, gen())
    assert torch.equal(none, x)
    half = CanvasAugment(**{**OFF, "cutout": 2, "cutout_p": 0.5})(torch.ones(2000, 144), gen())
    frac = ((half == 0).sum(1) > 0).float().mean().item()
    assert 0.45 < frac < 0.55


def test_noise_std_and_brightness_range():
    x = torch.full((200, 1, 12, 12), 0.5)
    out = CanvasAugment(**{**OFF, "noise_std": 0.05})(x, gen())
    assert abs((out - x).std().item() - 0.05) < 0.002
    assert abs((out - x).mean().item()) < 0.002
    br = CanvasAugment(**{**OFF, "brightness": (0.8, 1.2)})(x, gen())
    factor = br[:, 0, 0, 0] / 0.5
    assert factor.min() >= 0.8 - 1e-6 and factor.max() <= 1.2 + 1e-6
    assert torch.allclose(br, factor.view(-1, 1, 1, 1) * 0.5)
    assert factor.std() > 0.05


@pytest.mark.parametrize("kwargs", [
    {"rotation": -1.0}, {"rotation": float("nan")}, {"scale": (0.0, 1.0)}, {"scale": (1.2, 1.0)},
    {"scale": 1.0}, {"shift": -1.0}, {"brightness": (-0.1, 1.0)}, {"brightness": (1.2, 0.8)},
    {"noise_std": -0.1}, {"cutout": -1}, {"cutout": 1.5}, {"cutout_p": 1.5}, {"cutout_p": -0.1},
])
def test_augment_bad_params_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        CanvasAugment(**kwargs)


def test_augment_bad_inputs_raise():
    aug = CanvasAugment()
    with pytest.raises(ValueError, match="x"):
        aug(torch.zeros(4, 143), gen())
    with pytest.raises(ValueError, match="x"):
        aug(torch.zeros(4, 12, 12), gen())
    with pytest.raises(ValueError, match="x"):
        aug(torch.zeros(4, 144, dtype=torch.long), gen())
    with pytest.raises(ValueError, match="generator"):
        aug(torch.zeros(4, 144), 0)
    with pytest.raises(ValueError, match="cutout"):
        CanvasAugment(cutout=13)(torch.zeros(2, 144), gen())


# --- index batches and two-view dataset ---------------------------------------------------------

@pytest.mark.parametrize("n,bs", [(100, 8), (100, 128), (7, 7), (10, 3)])
def test_index_batches_cover_each_index_once(n, bs):
    g = gen()
    for _ in range(2):
        batches = list(index_batches(n, bs, g))
        idx = torch.cat(batches)
        assert idx.dtype == torch.long
        assert sorted(idx.tolist()) == list(range(n))
        assert all(len(b) == bs for b in batches[:-1])
    first = torch.cat(list(index_batches(n, bs, gen(1))))
    again = torch.cat(list(index_batches(n, bs, gen(1))))
    assert torch.equal(first, again)
    dropped = list(index_batches(n, bs, gen(), drop_last=True))
    assert all(len(b) == bs for b in dropped) and len(dropped) == n // bs


def test_index_batches_bad_inputs_raise():
    with pytest.raises(ValueError, match="n "):
        index_batches(0, 4, gen())
    with pytest.raises(ValueError, match="batch_size"):
        index_batches(10, 0, gen())
    with pytest.raises(ValueError, match="generator"):
        index_batches(10, 2, None)


def test_two_view_dataset_returns_indices(canvas):
    x, _ = canvas
    ds = TwoViewDataset(x, CanvasAugment(), gen())
    assert len(ds) == len(x)
    v1, v2, i = ds[3]
    assert v1.shape == x[3].shape and i == 3 and not torch.equal(v1, v2)
    idx = next(iter(index_batches(len(ds), 16, gen())))
    b1, _b2, bi = ds[idx]
    assert b1.shape == (16, 1, 12, 12) and torch.equal(bi, idx)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="generator"):
        TwoViewDataset(x, CanvasAugment(), 0)


# --- models -------------------------------------------------------------------------------------

def test_model_output_normalised_and_features_shape():
    torch.manual_seed(0)
    model = ContrastiveModel(MLPEncoder(), Projector())
    x = torch.rand(8, 1, 12, 12)
    z = model(x)
    assert z.shape == (8, 64)
    assert torch.allclose(z.norm(dim=1), torch.ones(8), atol=1e-5)
    assert model.features(x).shape == (8, 128)
    assert model.features(x.flatten(1)).shape == (8, 128)
    z.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    p = Projector(feat=128, out=32, hidden=64)
    assert torch.allclose(p(torch.randn(4, 128)).norm(dim=1), torch.ones(4), atol=1e-5)


def test_model_bad_inputs_raise():
    with pytest.raises(ValueError, match="hidden"):
        MLPEncoder(hidden=0)
    with pytest.raises(ValueError, match="out"):
        Projector(out=-1)
    with pytest.raises(ValueError, match="x"):
        MLPEncoder()(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="backbone"):
        ContrastiveModel("a", Projector())


def test_encode_restores_mode_and_matches_features():
    torch.manual_seed(0)
    model = ContrastiveModel(MLPEncoder(), Projector())
    model.train()
    x = torch.rand(37, 1, 12, 12)
    f = encode(model, x, batch_size=10)
    assert f.shape == (37, 128) and not f.requires_grad
    assert model.training
    assert torch.allclose(f, model.features(x).detach(), atol=1e-6)
    model.eval()
    encode(model, x)
    assert not model.training
    with pytest.raises(ValueError, match="batch_size"):
        encode(model, x, batch_size=0)


# --- probes -------------------------------------------------------------------------------------

def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    n, d = 400, 16
    y = rng.integers(0, 4, size=2 * n)
    centers = rng.normal(size=(4, d)) * 5
    x = centers[y] + rng.normal(size=(2 * n, d))
    assert linear_probe_accuracy(x[:n], y[:n], x[n:], y[n:]) > 0.98
    y_rand = rng.integers(0, 4, size=2 * n)
    x_rand = rng.normal(size=(2 * n, d))
    acc = linear_probe_accuracy(torch.from_numpy(x_rand[:n]), torch.from_numpy(y_rand[:n]),
                                torch.from_numpy(x_rand[n:]), torch.from_numpy(y_rand[n:]))
    assert 0.15 < acc < 0.35


def test_knn_two_clusters():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 8)) * 0.1 + np.r_[1.0, np.zeros(7)]
    b = rng.normal(size=(50, 8)) * 0.1 + np.r_[0.0, 1.0, np.zeros(6)]
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    tr, te = np.arange(0, 100, 2), np.arange(1, 100, 2)
    for k in (1, 10):
        assert knn_accuracy(x[tr], y[tr], x[te], y[te], k=k) == 1.0


def test_probe_bad_inputs_raise():
    x, y = np.zeros((10, 3)), np.r_[np.zeros(5), np.ones(5)]
    with pytest.raises(ValueError, match="k"):
        knn_accuracy(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="k"):
        knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="train_y"):
        linear_probe_accuracy(x, y[:5], x, y)
    with pytest.raises(ValueError, match="width"):
        knn_accuracy(x, y, np.zeros((10, 4)), y)
    with pytest.raises(ValueError, match="test_feats"):
        linear_probe_accuracy(x, y, np.zeros(10), y)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe_accuracy(x, np.zeros(10), x, y)


def test_probe_on_canvas_encoder_end_to_end(canvas):
    x, y = canvas
    torch.manual_seed(0)
    model = ContrastiveModel(MLPEncoder(), Projector())
    f = encode(model, x)
    acc = linear_probe_accuracy(f[:192], y[:192], f[192:], y[192:])
    assert 0.0 <= acc <= 1.0
    assert knn_accuracy(f[:192], y[:192], f[192:], y[192:], k=10) > 0.1


def test_scale_zooms_in_for_factor_above_one():
    x = torch.zeros(1, 1, 12, 12)
    x[0, 0, 4:8, 4:8] = 1.0
    for s in (0.5, 2.0):
        out = CanvasAugment(**{**OFF, "scale": (s, s)})(x, gen())
        assert out.sum().item() == pytest.approx(16.0 * s * s, rel=1e-4)

"""DNO rewards and in-distribution metrics on sklearn digits in [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optfm.alignment.dno_rewards import (
    REWARDS,
    BrightnessReward,
    ClassifierReward,
    CompressibilityReward,
    DigitClassifier,
    DigitsReference,
    OnPixelReward,
    RandomForestReward,
    load_digits_pm1,
    load_or_train_digit_classifier,
    make_reward,
    noise_sq_norm,
    train_digit_classifier,
)

TARGET = 3


@pytest.fixture(scope="module")
def digits():
    return load_digits_pm1()


@pytest.fixture(scope="module")
def classifier():
    return load_or_train_digit_classifier()


@pytest.fixture(scope="module")
def forest_reward():
    return RandomForestReward(TARGET)


@pytest.fixture(scope="module")
def reference():
    return DigitsReference()


def _off_manifold(n: int = 64):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    blobs = torch.ones(4, 1, 8, 8)
    return noise, blobs


def test_digits_scaled_to_pm1(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert digits.x_train.min().item() == -1.0 and digits.x_train.max().item() == 1.0


def test_brightness_of_constant_images():
    x = torch.stack([torch.full((1, 8, 8), v) for v in (-1.0, 0.0, 0.25, 1.0)])
    r, _ = BrightnessReward()(x, None, None)
    assert r.shape == (4,)
    torch.testing.assert_close(r, torch.tensor([-1.0, 0.0, 0.25, 1.0]))
    assert BrightnessReward.differentiable
    # flat input, and the gradient of the mean is 1/64 everywhere
    xf = torch.zeros(2, 64, requires_grad=True)
    BrightnessReward()(xf)[0].sum().backward()
    torch.testing.assert_close(xf.grad, torch.full((2, 64), 1 / 64))


def test_classifier_accuracy_and_cache(digits, classifier, tmp_path, monkeypatch):
    acc = (classifier(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc > 0.95
    assert not any(p.requires_grad for p in classifier.parameters())
    # second load reads the cached safetensors file and gives identical weights
    again = load_or_train_digit_classifier()
    for (k, a), (_, b) in zip(classifier.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # a new cache dir: trains, writes one file (no temp left), settings change the key
    monkeypatch.setenv("OPTFM_CACHE", str(tmp_path))
    load_or_train_digit_classifier(steps=5, hidden=8)
    files = sorted(p.name for p in (tmp_path / "dno").iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors")
    load_or_train_digit_classifier(steps=6, hidden=8)
    assert len(list((tmp_path / "dno").iterdir())) == 2
    # a corrupt cache file is retrained and overwritten
    bad = tmp_path / "dno" / files[0]
    bad.write_bytes(b"not a safetensors file")
    model = load_or_train_digit_classifier(steps=5, hidden=8)
    assert isinstance(model, DigitClassifier) and bad.stat().st_size > 100


def test_train_digit_classifier_is_seeded():
    a = train_digit_classifier(seed=1, steps=3, hidden=8)
    b = train_digit_classifier(seed=1, steps=3, hidden=8)
    c = train_digit_classifier(seed=2, steps=3, hidden=8)
    assert torch.equal(a.net[0].weight, b.net[0].weight)
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_classifier_reward_prefers_target_and_has_gradient(digits, classifier):
    reward = ClassifierReward(TARGET, classifier)
    assert reward.differentiable
    r, info = reward(digits.x_test)
    assert r.shape == (len(digits.x_test),) and (r <= 0).all()
    is_t = digits.y_test == TARGET
    assert r[is_t].mean() > r[~is_t].mean() + 3.0
    assert info["prob"][is_t].mean() > 0.9
    x = digits.x_test[:8].clone().requires_grad_(True)
    reward(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # flat input gives the same reward
    torch.testing.assert_close(reward(digits.x_test[:8].reshape(8, 64))[0], r[:8])


def test_random_forest_reward(digits, forest_reward):
    assert not forest_reward.differentiable
    x = digits.x_test.clone().requires_grad_(True)
    r, info = forest_reward(x)
    assert r.shape == (len(digits.x_test),) and not r.requires_grad
    assert ((r >= 0) & (r <= 1)).all()
    is_t = digits.y_test == TARGET
    assert r[is_t].mean() > 0.6 and r[~is_t].mean() < 0.1
    acc = (info["pred"] == digits.y_test.numpy()).mean()
    assert acc > 0.95


def test_on_pixel_count():
    x = -torch.ones(3, 1, 8, 8)
    x[1, 0, :2, :] = 1.0  # 16 pixels on
    x[2] = 0.5
    x[2, 0, 0, 0] = 0.0  # exactly at the threshold: off
    r, info = OnPixelReward()(x)
    torch.testing.assert_close(r, torch.tensor([0.0, 16 / 64, 63 / 64]))
    assert info["count"].tolist() == [0, 16, 63]
    r_hi, _ = OnPixelReward(threshold=0.75)(x)
    torch.testing.assert_close(r_hi, torch.tensor([0.0, 16 / 64, 0.0]))
    assert not OnPixelReward.differentiable


def test_compressibility_constant_beats_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.rand(1, 1, 8, 8, generator=g) * 2 - 1])
    r, info = CompressibilityReward()(x)
    size = info["compressed_bytes"]
    assert size[0] < size[1]
    assert r[0] > r[1]  # reward = -bytes: higher is more compressible
    torch.testing.assert_close(r, -torch.as_tensor(size, dtype=torch.float32))


def test_metrics_separate_real_from_noise_and_blobs(digits, reference):
    noise, blobs = _off_manifold()
    real = digits.x_test
    ll = {k: reference.pca_gmm_loglik(v) for k, v in
          {"real": real, "noise": noise, "blobs": blobs}.items()}
    assert ll["real"].shape == (len(real),) and isinstance(ll["real"], np.ndarray)
    assert ll["real"].mean() > ll["noise"].mean() + 20
    assert ll["real"].mean() > ll["blobs"].mean() + 50
    dist = {k: reference.nearest_distance(v) for k, v in
            {"real": real, "noise": noise, "blobs": blobs}.items()}
    assert dist["real"].max() < dist["noise"].min()
    assert dist["real"].max() < dist["blobs"].min()
    conf = {k: reference.gold_confidence(v) for k, v in
            {"real": real, "noise": noise, "blobs": blobs}.items()}
    assert conf["real"].mean() > 0.9
    assert conf["real"].mean() > conf["noise"].mean() + 0.3
    assert conf["real"].mean() > conf["blobs"].mean() + 0.3
    gold_acc = (reference.gold_predict(real) == digits.y_test.numpy()).mean()
    assert gold_acc > 0.95


def test_nearest_distance_of_a_training_image_is_zero(digits, reference):
    d = reference.nearest_distance(digits.x_train[:5].reshape(5, 64).numpy())
    np.testing.assert_allclose(d, 0.0, atol=1e-5)


def test_reference_is_seeded(reference, digits):
    other = DigitsReference()
    np.testing.assert_allclose(other.pca_gmm_loglik(digits.x_test[:10]),
                               reference.pca_gmm_loglik(digits.x_test[:10]))


def test_evaluate_and_noise_sq_norm(reference, digits):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 16, 16, generator=g)  # any latent shape
    np.testing.assert_allclose(noise_sq_norm(z), 1.0, atol=0.2)
    np.testing.assert_allclose(noise_sq_norm(2 * z), 4 * noise_sq_norm(z), rtol=1e-12)
    np.testing.assert_allclose(noise_sq_norm(2 * z), 4.0, atol=0.8)
    np.testing.assert_allclose(DigitsReference.noise_sq_norm(z.numpy()), noise_sq_norm(z))
    out = reference.evaluate(digits.x_test[:4], noise=z)
    assert set(out) == {"gmm_loglik", "nearest_dist", "gold_conf", "noise_sq_norm"}
    assert all(v.shape == (4,) for v in out.values())


@pytest.mark.parametrize("shape", [(8, 8), (2, 8, 8), (2, 3, 8, 8), (2, 1, 4, 4), (2, 63), (0, 64)])
def test_bad_shapes_raise(shape, classifier, forest_reward, reference):
    x = torch.zeros(shape)
    rewards = [BrightnessReward(), ClassifierReward(TARGET, classifier), forest_reward,
               OnPixelReward(), CompressibilityReward()]
    for reward in rewards:
        with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\) or \(B, 64\)|at least one"):
            reward(x)
    for metric in (reference.pca_gmm_loglik, reference.nearest_distance,
                   reference.gold_confidence):
        with pytest.raises(ValueError, match=r"shape|at least one"):
            metric(x)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="target"):
        ClassifierReward(10, DigitClassifier(8))
    with pytest.raises(ValueError, match="target"):
        RandomForestReward(-1)
    with pytest.raises(ValueError, match="threshold"):
        OnPixelReward(threshold=2.0)
    with pytest.raises(ValueError, match="level"):
        CompressibilityReward(level=10)
    with pytest.raises(ValueError, match="steps"):
        train_digit_classifier(steps=0)
    with pytest.raises(ValueError, match="noise"):
        noise_sq_norm(torch.zeros(3))
    with pytest.raises(ValueError, match="reward name"):
        make_reward("nope")


def test_make_reward(classifier):
    assert isinstance(make_reward("brightness"), BrightnessReward)
    r = make_reward("classifier", target=7, classifier=classifier)
    assert isinstance(r, ClassifierReward) and r.target == 7
    assert isinstance(make_reward("on_pixels", threshold=0.5), OnPixelReward)
    assert isinstance(make_reward("compressibility"), CompressibilityReward)
    assert set(REWARDS) == {"brightness", "classifier", "random_forest", "on_pixels",
                            "compressibility"}

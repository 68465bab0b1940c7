import pytest
import torch
from torch import nn

from optfm.models import mlp, tiny_gpt2
from optfm.training import load_checkpoint, make_generator, save_checkpoint, seed_everything


def _setup():
    model = nn.Sequential(mlp(8, 16, 4), nn.Dropout(0.3))  # dropout draws from the global RNG
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


def _train(model, opt, sched, gen, steps):
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        noise = torch.randn(16, 4)  # global RNG, restored by the checkpoint
        opt.zero_grad()
        nn.functional.cross_entropy(model(x) + 0.01 * noise, y).backward()
        opt.step()
        sched.step()


def test_resume_is_bit_exact(tmp_path):
    seed_everything(0)
    model, opt, sched = _setup()
    gen = make_generator(1)
    _train(model, opt, sched, gen, 3)
    save_checkpoint(tmp_path / "ck.safetensors", model=model, optimizer=opt, scheduler=sched,
                    step=3, generators={"data": gen}, extra={"note": "mid-run"})
    _train(model, opt, sched, gen, 4)
    reference = [p.detach().clone() for p in model.parameters()]

    seed_everything(123)  # scramble every RNG; the checkpoint must restore them
    model2, opt2, sched2 = _setup()
    gen2 = make_generator(999)
    ck = load_checkpoint(tmp_path / "ck.safetensors", model=model2, optimizer=opt2,
                         scheduler=sched2, generators={"data": gen2})
    assert ck.step == 3 and ck.extra == {"note": "mid-run"}
    _train(model2, opt2, sched2, gen2, 4)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    assert sched2.last_epoch == sched.last_epoch


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    assert model.lm_head.weight is model.transformer.wte.weight
    save_checkpoint(tmp_path / "g.safetensors", model=model, save_rng=False)
    other = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    load_checkpoint(tmp_path / "g.safetensors", model=other)
    assert torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)
    assert other.lm_head.weight is other.transformer.wte.weight


def test_checkpoint_is_safetensors_not_pickle(tmp_path):
    from safetensors import safe_open

    model = mlp(4, 4, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, step=5)
    with safe_open(str(path), framework="pt") as f:
        assert "model/0.weight" in set(f.keys())
        assert "optfm" in f.metadata()
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left


def test_checkpoint_errors(tmp_path):
    model = mlp(4, 4, 2)
    with pytest.raises(ValueError, match="step must be"):
        save_checkpoint(tmp_path / "c.safetensors", model=model, step=-1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", model=model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=sgd)
    with pytest.raises(ValueError, match="holds SGD state"):
        load_checkpoint(tmp_path / "c.safetensors", model=model,
                        optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="no scheduler state"):
        load_checkpoint(tmp_path / "c.safetensors", model=model,
                        scheduler=torch.optim.lr_scheduler.StepLR(sgd, 1))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an optfm checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors", model=model)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "c.safetensors", model=model, extra={"obj": object()})

import pytest
import torch

from optfm.models import (
    count_parameters,
    mlp,
    tiny_gpt2,
    tiny_llama,
    tiny_sequence_classifier,
    tiny_unet2d,
)
from optfm.training import make_generator


@pytest.mark.parametrize(("factory", "expected"), [
    (mlp, 9_610),
    (tiny_llama, 869_760),
    (tiny_gpt2, 891_776),
    (tiny_sequence_classifier, 176_706),
    (lambda: tiny_sequence_classifier(arch="gpt2"), 172_416),
    (tiny_unet2d, 701_345),
])
def test_parameter_counts_match_docstrings(factory, expected):
    assert count_parameters(factory()) == expected


def test_forward_shapes():
    ids = torch.randint(0, 257, (2, 16))
    assert tiny_llama(num_hidden_layers=1)(ids).logits.shape == (2, 16, 257)
    assert tiny_gpt2(n_layer=1)(ids).logits.shape == (2, 16, 257)
    out = tiny_sequence_classifier(num_labels=3)(torch.randint(0, 1000, (2, 8)))
    assert out.logits.shape == (2, 3)
    assert tiny_unet2d()(torch.randn(2, 1, 8, 8), torch.tensor([1, 500])).sample.shape == (2, 1, 8, 8)
    assert mlp()(torch.randn(5, 64)).shape == (5, 10)


def test_llama_is_untied_and_byte_eos():
    m = tiny_llama(num_hidden_layers=1)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert m.config.eos_token_id == 256


def test_mlp_generator_makes_identical_models_and_validation():
    a, b = mlp(generator=make_generator(5)), mlp(generator=make_generator(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(mlp(hidden=(32, 16))[3], torch.nn.Tanh)
    with pytest.raises(ValueError, match="activation"):
        mlp(activation="swish")
    with pytest.raises(ValueError, match="hidden"):
        mlp(hidden=0)
    with pytest.raises(ValueError, match="arch"):
        tiny_sequence_classifier(arch="t5")


def test_count_parameters_trainable_and_shared():
    m = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8)
    total = count_parameters(m)
    m.transformer.wte.weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == total - 20 * 16

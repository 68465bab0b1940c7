from dataclasses import dataclass
from typing import Literal

import pytest

from optfm.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)


@dataclass
class Cfg(ExperimentConfig):
    steps: int = 10
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    lrs: tuple[float, ...] = (0.1, 0.2)
    kind: Literal["a", "b"] = "a"
    limit: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


def test_overrides_parse_each_type():
    c = apply_overrides(Cfg(), ["steps=5", "lr=1e-3", "flag=true", "name=hi", "lrs=1,2.5",
                                "kind=b", "limit=7", "seed=3"])
    assert (c.steps, c.lr, c.flag, c.name, c.lrs, c.kind, c.limit, c.seed) == (
        5, 1e-3, True, "hi", (1.0, 2.5), "b", 7, 3)
    assert apply_overrides(c, {"limit": "none"}).limit is None


@pytest.mark.parametrize(("item", "msg"), [
    ("nope=1", "unknown config key 'nope'; allowed keys: seed, threads, device, steps"),
    ("steps=abc", "expected int"),
    ("lr=fast", "expected float"),
    ("flag=maybe", "expected bool"),
    ("kind=c", "one of 'a', 'b'"),
    ("lrs=1,x", "comma-separated list of float"),
    ("steps", "expects key=value"),
    ("steps=0", "steps must be >= 1"),
    ("device=tpu", "device must be"),
])
def test_bad_overrides_name_the_problem(item, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        apply_overrides(Cfg(), [item])


def test_dict_round_trip():
    c = Cfg(lrs=(0.5,), limit=3)
    d = config_to_dict(c)
    assert d["lrs"] == [0.5]
    assert config_from_dict(Cfg, d) == c
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict(Cfg, {**d, "extra": 1})

import dataclasses

import pytest

from fastssl.engine import parse_overrides, resolve_config, save_config
from fastssl.methods.base import TrainConfig


@dataclasses.dataclass
class DemoConfig(TrainConfig):
    temperature: float = 0.2
    queue_size: int = 65536


def test_merge_order_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("temperature: 0.5\nbatch_size: 64\nfused: false\nbetas: [0.9, 0.95]\n")
    cfg = resolve_config(DemoConfig, path, parse_overrides(["batch_size=32", "clip_grad=3.0"]))
    assert cfg.temperature == 0.5          # YAML over default
    assert cfg.batch_size == 32            # override over YAML
    assert cfg.fused is False
    assert cfg.betas == (0.9, 0.95)
    assert cfg.clip_grad == 3.0
    assert cfg.queue_size == 65536         # untouched default
    assert isinstance(cfg.batch_size, int)


def test_override_types_are_converted():
    cfg = resolve_config(DemoConfig, None, parse_overrides(
        ["fused=False", "compile=yes", "betas=0.8,0.9", "weight_decay_end=0.4", "max_steps=none",
         "base_lr=1e-3"]))
    assert (cfg.fused, cfg.compile, cfg.betas) == (False, True, (0.8, 0.9))
    assert cfg.weight_decay_end == 0.4 and cfg.max_steps is None and cfg.base_lr == 1e-3


@pytest.mark.parametrize("items", [["tempreature=0.1"], ["batch_size=1.5"], ["fused=maybe"], ["nokey"]])
def test_bad_override_is_an_error(items):
    with pytest.raises(ValueError, match="tempreature|batch_size|fused|nokey"):
        resolve_config(DemoConfig, None, parse_overrides(items))


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("queue_sise: 10\n")
    with pytest.raises(ValueError, match="unknown key 'queue_sise'.*valid keys"):
        resolve_config(DemoConfig, path)
    with pytest.raises(ValueError, match="config file"):
        resolve_config(DemoConfig, tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(DemoConfig, None, {"temperature": "0.3", "betas": "0.5,0.6"})
    save_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(DemoConfig, tmp_path / "config.yaml") == cfg


def test_views_are_a_mapping_from_the_command_line_or_yaml_and_round_trip(tmp_path):
    cfg = resolve_config(DemoConfig, None, parse_overrides(["views={scale: [0.5, 1], blur_p: 0}"]))
    assert cfg.views == {"scale": (0.5, 1), "blur_p": 0}
    save_config(cfg, tmp_path / "config.yaml")
    assert "scale:\n  - 0.5\n  - 1\n" in (tmp_path / "config.yaml").read_text()
    assert resolve_config(DemoConfig, tmp_path / "config.yaml") == cfg
    preset = resolve_config(DemoConfig, None, None, preset={"views": {"scale": (0.5, 1)}})
    assert preset.views == {"scale": (0.5, 1)}
    assert resolve_config(DemoConfig).views == {}


@pytest.mark.parametrize("item, names", [
    ("views={size: 32}", ["views", "'size'", "valid keys", "scale"]),
    ("views={scale: [0.5, 2]}", ["views", "scale", "(0, 1]", "2.0"]),
    ("views={blur_p: 1.5}", ["views", "blur_p", "1.5"]),
    ("views=[0.5, 1]", ["views", "mapping", "[0.5, 1]"]),
    ("views={scale: [0.5", ["views", "mapping"]),
])
def test_bad_views_name_the_key_and_what_was_expected(item, names):
    with pytest.raises(ValueError) as info:
        resolve_config(DemoConfig, None, parse_overrides([item]))
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_eval_size_defaults_to_the_training_size_and_is_refused_for_a_vit():
    assert resolve_config(DemoConfig, None, {"image_size": "24"}).eval_side == 24
    assert resolve_config(DemoConfig, None, {"image_size": "24", "eval_size": "28"}).eval_side == 28
    with pytest.raises(ValueError, match=r"eval_size: a ViT's position embedding .* \(24\).* got 28"):
        resolve_config(DemoConfig, None, {"backbone": "vit_tiny_patch4", "image_size": 24, "eval_size": 28})
    with pytest.raises(ValueError, match="eval_size: expected >= 1"):
        resolve_config(DemoConfig, None, {"eval_size": "0"})

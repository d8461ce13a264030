import dataclasses
import typing
from typing import ClassVar

import pytest
import yaml

from fastssl.cli import main
from fastssl.config import MethodConfig, components, field_types, key_index, setting
from fastssl.engine import parse_overrides, resolve_config, save_config
from fastssl.engine.config import flat_config, load_config
from fastssl.methods import METHODS


@dataclasses.dataclass
class DemoConfig(MethodConfig):
    name: ClassVar[str] = "demo"
    temperature: float = setting(0.2, "softmax temperature", low=0, low_open=True, high=100)
    queue_size: int = setting(65536, "negatives kept", low=1, high=1 << 24)


def test_merge_order_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("temperature: 0.5\nbatch_size: 64\nfused: false\nbetas: [0.9, 0.95]\n")
    cfg = resolve_config(DemoConfig, path, parse_overrides(["batch_size=32", "clip_grad=3.0"]))
    assert cfg.method.temperature == 0.5          # YAML over default
    assert cfg.data.batch_size == 32              # override over YAML
    assert cfg.model.fused is False
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.clip_grad == 3.0
    assert cfg.method.queue_size == 65536         # untouched default
    assert isinstance(cfg.data.batch_size, int)


def test_the_methods_defaults_sit_between_the_components_and_a_preset():
    dino = METHODS["dino"].config_class
    assert resolve_config(dino).optim.optimizer == "adamw"       # DINO's paper recipe over the sgd default
    preset = resolve_config(dino, preset={"optimizer": "sgd"}, overrides={"base_lr": "0.1"})
    assert (preset.optim.optimizer, preset.optim.base_lr) == ("sgd", 0.1)


def test_flat_dotted_and_nested_yaml_keys_name_the_same_field(tmp_path):
    flat = resolve_config(DemoConfig, None, {"base_lr": "0.5", "temperature": "0.3"})
    dotted = resolve_config(DemoConfig, None, {"optim.base_lr": "0.5", "method.temperature": "0.3"})
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.5\nmethod:\n  temperature: 0.3\n")
    assert flat == dotted == resolve_config(DemoConfig, path)
    with pytest.raises(ValueError, match="'model.base_lr': base_lr belongs to optim, not model"):
        resolve_config(DemoConfig, None, {"model.base_lr": "0.5"})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_key_is_declared_once_across_the_components(name):
    index = key_index(METHODS[name].config_class)   # raises on a name two components declare
    assert {"base_lr", "batch_size", "rank_batch_size", "loader", "parallel", "vit_depth"} <= set(index)
    assert all(f.metadata["help"] for _, f in index.values()), "every key carries its meaning"


def test_a_key_given_twice_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'base_lr': given twice"):
        parse_overrides(["base_lr=1", "base_lr=2"])
    with pytest.raises(ValueError, match="key 'base_lr' given twice"):
        resolve_config(DemoConfig, None, {"base_lr": "1", "optim.base_lr": "2"})
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nepochs: 4\n")
    with pytest.raises(ValueError, match=r"c.yaml.*line 2.*'epochs' given twice"):
        resolve_config(DemoConfig, path)
    path.write_text("epochs: 3\noptim:\n  epochs: 4\n")
    with pytest.raises(ValueError, match="c.yaml.*'epochs' given twice"):
        resolve_config(DemoConfig, path)


def test_the_method_is_not_a_key(tmp_path):
    with pytest.raises(ValueError, match="'method' is not a key: choose the method with --method"):
        resolve_config(DemoConfig, None, {"method": "dino"})
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: dino\n")
    with pytest.raises(ValueError, match="method.name 'dino' is not this run's method 'demo'"):
        resolve_config(DemoConfig, path)


def test_a_yaml_list_where_a_number_belongs_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: [3]\n")
    with pytest.raises(ValueError) as info:
        resolve_config(DemoConfig, path)
    message = str(info.value)
    assert "c.yaml" in message and "'epochs'" in message and "int" in message and "\n" not in message


def test_override_types_are_converted():
    cfg = resolve_config(DemoConfig, None, parse_overrides(
        ["fused=False", "compile=yes", "betas=0.8,0.9", "weight_decay_end=0.4", "max_steps=none",
         "base_lr=1e-3"]))
    assert (cfg.model.fused, cfg.model.compile, cfg.optim.betas) == (False, "true", (0.8, 0.9))
    assert cfg.optim.weight_decay_end == 0.4 and cfg.run.max_steps is None and cfg.optim.base_lr == 1e-3


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


def _numeric_keys():
    for name, cls in sorted(METHODS.items()):
        classes = components(cls.config_class)
        for key, (comp, f) in key_index(cls.config_class).items():
            annotation = field_types(classes[comp])[key]
            base = next(a for a in (*typing.get_args(annotation), annotation) if a is not type(None))
            if typing.get_origin(base) is tuple:
                yield pytest.param(cls.config_class, key, f, float, 2, id=f"{name}-{key}")
            elif base in (int, float):
                yield pytest.param(cls.config_class, key, f, base, 1, id=f"{name}-{key}")


@pytest.mark.parametrize("method_class, key, f, kind, count", list(_numeric_keys()))
def test_every_numeric_key_refuses_inf_nan_and_values_out_of_range(method_class, key, f, kind, count):
    m = f.metadata
    assert m["low"] is not None and m["high"] is not None, f"{key} has no range"
    above, below = m["high"] * 10 + 1, m["low"] - 1
    bad = ["inf", "nan", "1e400", "-inf"] + [str(kind(above)), str(kind(below))]
    for text in bad:
        with pytest.raises((ValueError, TypeError)) as info:
            resolve_config(method_class, None, {key: ",".join([text] * count)})
        message = str(info.value)
        assert key in message and "\n" not in message, (text, message)


@pytest.mark.parametrize("item, expected", [
    ("epochs=1e10", "epochs"), ("epochs=10000000000", "epochs must be an integer >= 1 and <= 1000000"),
    ("eval_every=inf", "eval_every must be a finite number"), ("dist_timeout_s=inf", "dist_timeout_s"),
    ("accum_steps=0", "accum_steps must be an integer >= 1"), ("accum_steps=-2", "accum_steps"),
    ("image_size=100000", "image_size must be an integer >= 1 and <= 4096"),
    ("num_threads=100000", "num_threads must be an integer >= 1 and <= 256"),
    ("parallel=banana", "parallel must be one of ddp, fsdp"), ("loader=pil", "loader must be one of"),
    ("max_skipped_fraction=-1", "max_skipped_fraction"), ("max_skipped_fraction=7", "max_skipped_fraction"),
    ("weight_decay=inf", "weight_decay"), ("clip_grad=inf", "clip_grad"), ("base_lr=1e400", "base_lr"),
    ("min_lr=1e9", "min_lr must be <= the LR"),
])
def test_the_probed_values_are_refused_at_resolve_time_in_one_line(item, expected):
    with pytest.raises(ValueError) as info:
        resolve_config(METHODS["rotnet"].config_class, None, parse_overrides([item]))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_default_warmup_fits_a_short_run_but_a_set_one_must_fit():
    dino = METHODS["dino"].config_class
    cfg = resolve_config(dino, None, {"epochs": "1"})        # the paper's 10 of 100 epochs, scaled
    assert cfg.optim.warmup_epochs == pytest.approx(0.1)
    assert resolve_config(dino, None, {"epochs": "50"}).optim.warmup_epochs == 10.0
    with pytest.raises(ValueError, match=r"warmup_epochs must be <= epochs \(1\), got 2.0"):
        resolve_config(dino, None, {"epochs": "1", "warmup_epochs": "2"})
    with pytest.raises(ValueError, match="freeze_last_layer_epochs must be <= epochs"):
        resolve_config(dino, None, {"epochs": "1", "freeze_last_layer_epochs": "3"})


def test_global_and_per_rank_batch_are_two_fields_one_derived_from_the_world_size():
    cfg = resolve_config(DemoConfig, None, {"batch_size": "64"}).for_world(4)
    assert (cfg.data.batch_size, cfg.data.rank_batch_size) == (64, 16)
    cfg = resolve_config(DemoConfig, None, {"batch_size": "none", "rank_batch_size": "16"}).for_world(4)
    assert (cfg.data.batch_size, cfg.data.rank_batch_size) == (64, 16)
    with pytest.raises(ValueError, match="batch_size: expected a multiple of the world size 3, got 64"):
        resolve_config(DemoConfig, None, {"batch_size": "64"}).for_world(3)
    with pytest.raises(ValueError, match="rank_batch_size: batch_size 64 over 4 process"):
        resolve_config(DemoConfig, None, {"batch_size": "64", "rank_batch_size": "8"}).for_world(4)
    with pytest.raises(ValueError, match="world size x accum_steps = 2 x 3"):
        resolve_config(DemoConfig, None, {"batch_size": "64", "accum_steps": "3"}).for_world(2)


def test_saved_config_round_trips_as_nested_yaml(tmp_path):
    cfg = resolve_config(DemoConfig, None, {"temperature": "0.3", "betas": "0.5,0.6"})
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["betas"] == [0.5, 0.6] and saved["method"] == {"name": "demo", "temperature": 0.3,
                                                                          "queue_size": 65536}
    assert resolve_config(DemoConfig, tmp_path / "config.yaml") == cfg
    assert load_config(DemoConfig, saved) == cfg


def test_a_run_folder_of_the_flat_layout_still_loads():
    """config.yaml as run folders wrote it before the components: flat keys, old names."""
    dino = METHODS["dino"].config_class
    old = {"method": "dino", "data": "fashion-mnist", "data_backend": "torchvision", "local_crops": 4,
           "local_size": 14, "backbone": "resnet8", "image_size": 28, "epochs": 4, "batch_size": 128,
           "warmup_epochs": 0.2, "parallel": "ddp", "betas": [0.9, 0.999], "views": {}, "out": "runs/x"}
    cfg = load_config(dino, old)
    assert (cfg.data.loader, cfg.method.n_local_crops, cfg.method.local_crop_size, cfg.data.source) == (
        "torchvision", 4, 14, "fashion-mnist")
    assert flat_config(old)["loader"] == "torchvision" and "method" not in flat_config(old)
    with pytest.raises(ValueError, match="not dino keys.*--print-config"):
        load_config(dino, {**old, "queue_size": 7})


def test_views_are_a_mapping_from_the_command_line_or_yaml_and_round_trip(tmp_path):
    cfg = resolve_config(DemoConfig, None, parse_overrides(["views={scale: [0.5, 1], blur_p: 0}"]))
    assert cfg.data.views == {"scale": (0.5, 1), "blur_p": 0}
    save_config(cfg, tmp_path / "config.yaml")
    assert "scale:\n    - 0.5\n    - 1\n" in (tmp_path / "config.yaml").read_text()
    assert resolve_config(DemoConfig, tmp_path / "config.yaml") == cfg
    preset = resolve_config(DemoConfig, None, None, preset={"views": {"scale": (0.5, 1)}})
    assert preset.data.views == {"scale": (0.5, 1)}
    assert resolve_config(DemoConfig).data.views == {}


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
    with pytest.raises(ValueError, match="eval_size must be an integer >= 1"):
        resolve_config(DemoConfig, None, {"eval_size": "0"})


def test_print_config_prints_the_resolved_nested_config(capsys):
    assert main(["train", "--method", "dino", "--data", "fashion-mnist", "base_lr=0.002",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["name"] == "dino" and printed["method"]["n_local_crops"] == 4   # the preset
    assert printed["optim"]["base_lr"] == 0.002 and printed["data"]["source"] == "fashion-mnist"


def test_help_lists_every_key_with_its_meaning_default_and_range(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "dino", "--help"])
    out = capsys.readouterr().out
    for key in key_index(METHODS["dino"].config_class):
        assert f"  {key}=" in out, key
    assert "teacher temperature after warm-up; > 0 and <= 100" in out
    assert "parallel=ddp" in out and "one of ddp|fsdp" in out


def test_method_key_beside_the_method_flag_is_refused(capsys):
    assert main(["train", "--method", "rotnet", "method=dino", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "'method' is not a key: choose the method with --method" in err and "\n" == err[-1]

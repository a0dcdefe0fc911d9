"""Config loading: defaults <- YAML <- overrides, type coercion, and errors that name the key."""

import dataclasses

import pytest

from jaxtune import config
from jaxtune.config_model import ModelConfig
from jaxtune.errors import ConfigError


def test_defaults_yaml_overrides_precedence(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_heads: 4\n  dim: 32\ntrain:\n  steps: 7\n  learning_rate: 1e-4\n")
  cfg = config.load(str(path), ["model.num_heads=2", "mesh.model=-1", "mesh.data=2"])
  assert cfg.model.num_heads == 2  # Override beats YAML.
  assert cfg.model.dim == 32  # YAML beats default.
  assert cfg.model.mlp_dim == ModelConfig().mlp_dim  # Default.
  assert cfg.train.steps == 7
  assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string.
  assert isinstance(cfg.train.learning_rate, float)
  assert (cfg.mesh.data, cfg.mesh.model) == (2, -1)


def test_required_keys_exist():
  cfg = config.load()
  for key in (
    "mesh.data",
    "mesh.model",
    "mesh.strategy",
    "model.num_heads",
    "model.num_kv_heads",
    "train.steps",
    "train.seed",
    "train.output_dir",
  ):
    section, name = key.split(".")
    assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}, key


def test_sections_are_frozen():
  cfg = config.load()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.dim = 3


def test_override_types_are_coerced():
  cfg = config.load(
    None,
    [
      "model.parallel_block=true",
      "model.rope_theta=500000",
      "model.num_kv_heads=none",
      "train.output_dir=123",
    ],
  )
  assert cfg.model.parallel_block is True
  assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
  assert cfg.model.num_kv_heads is None and cfg.model.kv_heads == cfg.model.num_heads
  assert cfg.train.output_dir == "123"


def test_preset_then_keys():
  cfg = config.load(None, ["model.preset=llama3-8b", "model.num_layers=2"])
  assert cfg.model.preset == "llama3-8b"
  assert cfg.model.num_kv_heads == 8 and cfg.model.rope_theta == 500000.0
  assert cfg.model.num_layers == 2


@pytest.mark.parametrize(
  "overrides, named",
  [
    (["model.num_hedas=4"], "model.num_hedas"),
    (["modle.dim=4"], "modle"),
    (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads=6"),
    (["model.dim=-8"], "model.dim=-8"),
    (["model.num_kv_heads=0"], "model.num_kv_heads=0"),
    (["model.mlp=relu"], "model.mlp='relu'"),
    (["mesh.strategy=dp"], "mesh.strategy='dp'"),
    (["mesh.data=-1", "mesh.model=-1"], "mesh.data and mesh.model"),
    (["train.steps=ten"], "train.steps='ten'"),
    (["train.steps=1.5"], "train.steps=1.5"),
    (["model.parallel_block=maybe"], "model.parallel_block='maybe'"),
    (["model.preset=llama9"], "model.preset=llama9"),
    (["model.dim"], "model.dim"),
    (["model.dim=65"], "model.dim=65"),  # Not divisible by 8 heads.
  ],
)
def test_bad_values_name_the_key(overrides, named):
  with pytest.raises(ConfigError) as e:
    config.load(None, overrides)
  assert named in str(e.value)


def test_unknown_key_suggests(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_haeds: 4\n")
  with pytest.raises(ConfigError, match=r"model\.num_haeds.*c\.yaml.*num_heads"):
    config.load(str(path))


def test_bad_yaml_files(tmp_path):
  with pytest.raises(ConfigError, match="cannot read"):
    config.load(str(tmp_path / "missing.yaml"))
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    config.load(str(bad))
  flat = tmp_path / "flat.yaml"
  flat.write_text("model: 3\n")
  with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
    config.load(str(flat))


def test_lima_dropout_rises_linearly_with_depth():
  cfg = config.load(
    None,
    ["model.num_layers=4", "model.residual_dropout=0.3", "model.residual_dropout_schedule=linear"],
  )
  assert cfg.model.layer_dropout_rates == pytest.approx((0.0, 0.1, 0.2, 0.3))


def test_shipped_configs_load():
  import pathlib

  for path in sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml")):
    config.load(str(path))


@pytest.mark.parametrize(
  "override, key, want",
  [
    ("data.system_prompt=yes", "system_prompt", "yes"),
    ("data.system_prompt=#1 rule: be brief", "system_prompt", "#1 rule: be brief"),
    ("data.system_prompt=You are: helpful", "system_prompt", "You are: helpful"),
    ("data.system_prompt=@home", "system_prompt", "@home"),
    ("data.system_prompt=%d", "system_prompt", "%d"),
    ("data.system_prompt=none", "system_prompt", None),
    ("train.output_dir=010", "output_dir", "010"),
    ("train.output_dir=12:30", "output_dir", "12:30"),
    ("train.output_dir= spaced ", "output_dir", " spaced "),
    ("train.steps=010", "steps", 10),
    ("train.learning_rate=1e-4", "learning_rate", 1e-4),
    ("train.resume=True", "resume", True),
    ("peft.lora_targets=[q, k,v]", "lora_targets", ("q", "k", "v")),
    ("peft.lora_targets=q,o", "lora_targets", ("q", "o")),
  ],
)
def test_override_text_is_converted_by_the_keys_type(override, key, want):
  cfg = config.load(None, [override])
  section = getattr(cfg, override.partition(".")[0])
  assert getattr(section, key) == want
  assert type(getattr(section, key)) is type(want)


@pytest.mark.parametrize(
  "override, named",
  [
    ("train.steps=@5", "train.steps='@5'"),
    ("train.steps=%5", "train.steps='%5'"),
    ("train.learning_rate=inf", "train.learning_rate=inf"),
    ("train.learning_rate=nan", "train.learning_rate=nan"),
    ("train.resume=maybe", "train.resume='maybe'"),
    ("model.num_kv_heads=4.0", "model.num_kv_heads=4.0"),
    ("model.mlp=SwiGLU", "model.mlp='SwiGLU'"),
    ("train.steps=", "train.steps=''"),
  ],
)
def test_override_text_that_does_not_parse_is_one_error(override, named):
  with pytest.raises(ConfigError) as e:
    config.load(None, [override])
  assert named in str(e.value) and "command line" in str(e.value)


@pytest.mark.parametrize(
  "overrides, named",
  [
    (["peft.method=lora", "peft.lora_alpha=0"], "peft.lora_alpha=0"),
    (["peft.method=prompt", "peft.prompt_length=0"], "peft.prompt_length=0"),
    (["peft.method=prefix", "peft.prefix_length=0"], "peft.prefix_length=0"),
    (["train.b1=2.0"], "train.b1=2.0"),
    (["train.b2=1.0"], "train.b2=1.0"),
    (["train.eps=-1"], "train.eps=-1"),
    (["train.seed=-1"], "train.seed=-1"),
    ([f"train.seed={2**64}"], "train.seed="),
    ([f"model.vocab_size={2**40}"], "model.vocab_size="),
    (["train.output_dir="], "train.output_dir"),
  ],
)
def test_values_nothing_can_train_with_are_refused(overrides, named):
  with pytest.raises(ConfigError) as e:
    config.load(None, overrides)
  assert named in str(e.value)


def test_a_method_length_of_zero_is_fine_for_other_methods():
  cfg = config.load(None, ["peft.method=lora", "peft.prompt_length=0", "peft.prefix_length=0"])
  assert cfg.peft.prompt_length == 0


def test_yaml_duplicate_keys_and_binary_files_are_errors(tmp_path):
  dup = tmp_path / "dup.yaml"
  dup.write_text("train:\n  steps: 5\n  steps: 7\n")
  with pytest.raises(ConfigError, match=r"dup\.yaml:3: duplicate key 'steps' \(first on line 2\)"):
    config.load(str(dup))
  dup.write_text("train:\n  steps: 5\ntrain:\n  seed: 1\n")
  with pytest.raises(ConfigError, match="duplicate key 'train'"):
    config.load(str(dup))
  binary = tmp_path / "bin.yaml"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ConfigError, match=r"bin\.yaml"):
    config.load(str(binary))


def test_run_paths_are_checked(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("")
  for bad in (str(a_file), str(a_file / "run")):
    with pytest.raises(ConfigError, match="train.output_dir"):
      config.check_paths(config.load(None, [f"train.output_dir={bad}"]))
  with pytest.raises(ConfigError, match="train.init_from=/nonexistent"):
    config.check_paths(config.load(None, ["train.init_from=/nonexistent"]))
  config.check_paths(config.load(None, [f"train.output_dir={tmp_path / 'new' / 'run'}"]))

"""The `jaxtune` command, run as a user would: verbs, and bad input as one clear line."""

import json

import numpy as np
import pytest
from subprocesses import jaxtune


def _jaxtune(*args, tmp_path=None):
  return jaxtune(*args, cwd=tmp_path)


def test_help_lists_the_verbs():
  result = _jaxtune("--help")
  assert result.returncode == 0
  for verb in ("train", "generate", "chat", "eval", "convert", "data"):
    assert verb in result.stdout


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ["model.num_heads=6", "model.num_kv_heads=4"],
      "model.num_heads=6 is not divisible by model.num_kv_heads=4",
    ),
    (["model.num_layerz=2"], "unknown key model.num_layerz (from the command line)"),
    (["model.dim=-64"], "model.dim=-64 must be positive"),
    (["mesh.data=3"], "mesh.data=3 x mesh.model=1 = 3 devices, but 1 are available"),
    (["train.batch_size=3", "mesh.data=1", "model.vocab_size=100"], "model.vocab_size=100"),
    (["data.max_length=4096", "model.max_seq_len=2048"], "data.max_length=4096 is longer"),
  ],
)
def test_bad_configuration_is_one_clear_line(overrides, message):
  result = _jaxtune("train", *overrides)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert f"jaxtune train: error: {message}" in result.stderr.strip().splitlines()[-1]


def test_train_runs_and_lowers_held_out_loss(tmp_path):
  run = tmp_path / "run"
  result = _jaxtune(
    "train",
    "train.steps=60",
    "train.log_every=20",
    "train.batch_size=8",
    "data.synthetic_examples=400",  # The mixture's 5 tasks, fewer records to tokenize.
    "train.held_out_prompts=4",
    f"train.output_dir={run}",
    tmp_path=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [20, 40, 60]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert evals[-1] < 0.6 * evals[0]
  assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in records if "loss" in r)
  # MFU against the best matmul of the CPU's sources (train/peak.py), named in the first record.
  assert records[0]["peak_source"] in ("xla", "numpy", "torch") and records[0]["peak_flops"] > 0
  assert all(0 < r["mfu"] < 1 for r in records if "loss" in r)
  assert (run / "checkpoints" / "60").is_dir() and (run / "config.yaml").is_file()
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert (run / "tokenizer" / "tokenizer.model").is_file()
  assert "held-out loss" in result.stderr
  _check_held_out_report(run, records, result.stdout)


def _check_held_out_report(run, records, stdout):
  """The exact match per task family before and after training: printed, in metrics.jsonl and
  in held_out.json, and equal to a recount of the answers it lists."""
  report = json.loads((run / "held_out.json").read_text())
  families = ["arithmetic", "reverse", "capitals", "counting", "sorting"]
  assert [report["before"]["step"], report["after"]["step"]] == [0, 60]
  for when in ("before", "after"):
    assert report[when]["prompts"] == dict.fromkeys(families, 4)
    recount = {f: [] for f in families}
    for a in report["answers"]:
      recount[a["where"].split("[")[0]].append(a[when].strip() == a["reference"].strip())
    assert report[when]["exact_match"] == {f: np.mean(v) for f, v in recount.items()}
    record = next(r for r in records if r["step"] == report[when]["step"] and "eval_loss" in r)
    assert record["held_out_exact_match"] == report[when]["exact_match_all"]
    for f in families:
      assert record[f"held_out_exact_match/{f}"] == report[when]["exact_match"][f]
  assert "held-out exact match (greedy, 20 prompts)" in stdout
  for f in families:  # The table's row, and one answer shown per family.
    assert any(line.split()[:2] == [f, "4"] for line in stdout.splitlines()), f
  assert stdout.count("reference: ") == 5
  shown = {a["prompt"]: a["after"] for a in report["answers"]}
  for block in stdout.split("\n> ")[1:]:
    prompt, answer = block.split("\n")[:2]
    assert shown[prompt] == answer


def test_data_inspect_on_lima_with_the_llama_tokenizer(data_dir):
  result = _jaxtune(
    "data",
    "inspect",
    f"data.path={data_dir / 'lima/lima_train_llamafactory.json'}",
    f"data.tokenizer={data_dir / 'tokenizers/llama2c/tokenizer.model'}",
    "data.template=lima",
    "data.max_length=2048",
    "-n",
    "1",
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "records      1029" in out and "added ['<EOT>']" in out
  assert "\u27e6" in out and "<EOT>\u27e7" in out  # A supervised span ending in EOT.
  assert "supervised" in out and "% of tokens" in out and "truncated" in out


def test_config_file_is_positional(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_heads: 6\n  num_kv_heads: 4\n")
  result = _jaxtune("train", str(path))
  assert result.returncode == 2
  assert "model.num_heads=6 is not divisible" in result.stderr


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.output_dir={file}", "train.output_dir={file}: is a file, not a folder"),
    ("train.output_dir=", "train.output_dir must not be empty"),
    ("train.init_from=/nonexistent", "train.init_from=/nonexistent: no such file or folder"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2**32)"),
  ],
)
def test_run_paths_and_ranges_are_one_line_before_anything_is_written(
  tmp_path, monkeypatch, capsys, override, message
):
  from jaxtune import cli

  monkeypatch.chdir(tmp_path)
  (tmp_path / "file").write_text("")
  file = str(tmp_path / "file")
  assert cli.main(["train", override.format(file=file)]) == 2
  assert capsys.readouterr().err.strip() == f"jaxtune train: error: {message.format(file=file)}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # No ./checkpoints left behind.

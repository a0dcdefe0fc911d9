"""`jaxtune generate`, `chat` and `eval` run as a user would, on the real stories260K model."""

import json

import pytest
from subprocesses import jaxtune as jaxtune_cli
from test_llama2c import PUBLISHED

import jaxtune
from jaxtune import generate
from jaxtune.data import packing, templates
from jaxtune.data.formats import Conversation, Message


@pytest.fixture(scope="module")
def checkpoint(data_dir):
  return data_dir / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def stories(checkpoint):
  return jaxtune.load(checkpoint)


def _ids(model, messages):
  chunks = templates.render(Conversation(tuple(messages)), model.template)
  return packing.tokenize(chunks, model.tokenizer, False).ids.tolist()


def test_generate_prints_the_published_text(checkpoint, stories):
  steps = len(stories.tokenizer.encode(PUBLISHED, first=True))
  result = jaxtune_cli("generate", checkpoint, "--prompt", "", "--max-new-tokens", steps)
  assert result.returncode == 0, result.stderr
  assert result.stdout == PUBLISHED + "\n"


def test_generate_a_prompts_file_in_alpaca_eval_form(checkpoint, stories, tmp_path):
  records = [
    {"dataset": "helpful_base", "instruction": "Tell me a story about a dog"},
    {"instruction": "Lily and Tom", "input": "went to the park"},
    {"instruction": "The sun"},
  ]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "outputs.jsonl"
  flags = ["--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
  args = ["--prompts-file", prompts, "--max-new-tokens", "16", "--output", out, *flags]
  result = jaxtune_cli("generate", checkpoint, *args, "--batch-size", "2", "--stop", "Tom")
  assert result.returncode == 0, result.stderr
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  sampling = generate.Sampling(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.95)
  messages = [Message("user", r["instruction"], r.get("input", "")) for r in records]
  outs = stories.generate([_ids(stories, [m]) for m in messages], sampling, seed=3)
  texts = [generate.cut_at_stop(stories.tokenizer.decode(o.ids), ["Tom"])[0] for o in outs]
  assert lines == [
    {**r, "output": text, "generator": "stories260K"}
    for r, text in zip(records, texts, strict=True)
  ]


def test_chat_streams_replies_to_the_whole_conversation(checkpoint, stories):
  turns = ["Once upon a time", "What did the cat do?"]
  result = jaxtune_cli("chat", checkpoint, "--max-new-tokens", "20", stdin="\n".join(turns) + "\n")
  assert result.returncode == 0, result.stderr
  history, want = [], []
  for turn in turns:
    history.append(Message("user", turn))
    (out,) = stories.generate([_ids(stories, history)], generate.Sampling(max_new_tokens=20))
    reply = stories.tokenizer.decode(out.ids)
    history.append(Message("assistant", reply))
    want.append(f"> {reply}\n")
  assert result.stdout == "".join(want) + "> "


def test_eval_prints_a_table_and_writes_json(checkpoint, data_dir, tmp_path):
  args = ["--task", "mmlu", "--data", data_dir / "mmlu" / "data", "--split", "val"]
  args += ["--subjects", "astronomy,virology", "--limit", "2", "--shots", "1"]
  result = jaxtune_cli("eval", checkpoint, *args, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  saved = json.loads((tmp_path / "runs" / "eval" / "stories260K" / "mmlu.json").read_text())
  assert saved["task"] == "mmlu" and saved["checkpoint"] == str(checkpoint)
  assert saved["options"]["subjects"] == ["astronomy", "virology"]
  assert [e["subject"] for e in saved["examples"]] == ["astronomy"] * 2 + ["virology"] * 2
  table = result.stdout
  assert f"accuracy_macro            {saved['metrics']['accuracy_macro']:.4f}" in table
  for subject in ("astronomy", "virology"):
    accuracy = saved["groups"][subject]["accuracy"]
    assert f"{subject}" in table and f"{accuracy:.4f}" in table


def test_bad_input_is_one_clear_line(checkpoint, tmp_path):
  bad = tmp_path / "test.jsonl"
  bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
  result = jaxtune_cli("eval", checkpoint, "--task", "gsm8k", "--data", bad, "--shots", "0")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last == f"jaxtune eval: error: {bad}:2: field 'answer': missing, empty or not a string"
  result = jaxtune_cli("generate", checkpoint, "--prompt", "Lily " * 600)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "leaves no room in the model's 512 positions" in result.stderr.strip().splitlines()[-1]
  result = jaxtune_cli("chat", checkpoint, "train.steps=3")
  assert result.returncode == 2
  assert "takes only mesh.* and distributed.* overrides, got 'train.steps=3'" in result.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    (["eval", "--task", "gsm8k", "--data", "x.jsonl", "--shots", "-1"], "shots=-1 must not be"),
    (["eval", "--task", "gsm8k", "--data", "x.jsonl", "--limit", "-1"], "limit=-1 must not be"),
    (["eval", "--task", "mmlu", "--data", "x", "--batch-size", "0"], "batch_size=0 must be"),
    (["eval", "--task", "mmlu", "--data", "x", "--output", "{old}"], "{old}: the file exists"),
    (["generate", "--prompt", "a", "--batch-size", "-1"], "--batch-size -1: must be positive"),
    (["generate", "--prompt", "a", "--temperature", "inf"], "must be finite"),
    (["generate", "--prompts-file", "p.jsonl", "--output", "{old}"], "{old}: the file exists"),
  ],
)
def test_bad_arguments_are_refused_before_the_model_loads(
  checkpoint, tmp_path, monkeypatch, capsys, args, message
):
  from jaxtune import cli

  old = tmp_path / "old.json"
  old.write_text("keep")
  monkeypatch.setattr(jaxtune, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  args = [a.format(old=old) for a in args]
  assert cli.main([args[0], str(checkpoint), *args[1:]]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"jaxtune {args[0]}: error: ") and message.format(old=old) in err
  assert old.read_text() == "keep"


def test_generate_force_overwrites_the_output(checkpoint, tmp_path, capsys):
  from jaxtune import cli

  prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
  prompts.write_text('{"instruction": "Lily"}\n')
  out.write_text("old\n")
  args = ["--prompts-file", str(prompts), "--output", str(out), "--max-new-tokens", "2"]
  args += ["--force", "distributed.mode=disabled"]  # JAX has started in this process.
  assert cli.main(["generate", str(checkpoint), *args]) == 0
  assert json.loads(out.read_text())["instruction"] == "Lily"

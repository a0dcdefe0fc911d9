"""Tasks as data (`eval.tasks`) and GPT-3's in-context runs (`eval.incontext`, `jaxtune eval
--tasks`): the Flan CoT files read as multiple-choice sets (checked against a plain reading of
the TSV), prompts equal to hand-written ones, YAML tasks, errors that name the place, and the
zero/one-shot table, JSON and plot of a run on stories260K."""

import dataclasses
import json

import numpy as np
import pytest

from jaxtune import cli
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval import incontext, mmlu, tasks

CHOICES = {"ecqa": 5, "qasc": 8, "strategyqa": 2, "creak": 2}


def _plain_rows(path):
  """question, answer of each line, split by hand (the TSV has no quoting)."""
  lines = path.read_text(encoding="utf-8").splitlines()
  return [line.split("\t")[:2] for line in lines if line]


@pytest.mark.parametrize("name", list(CHOICES))
def test_flan_cot_files_are_multiple_choice_sets(name, data_dir):
  task = tasks.find(name)
  questions, pool = incontext.split_docs(task, str(data_dir))
  rows = _plain_rows(data_dir / task.data)
  assert len(pool) == 64 and len(questions) == len(rows) - 64
  for doc, (question, answer) in zip(pool + questions, rows, strict=True):
    assert len(doc.choices) == CHOICES[name], doc.where
    listed = question.replace("\\n", "\n")
    if name == "qasc":  # The answer names a label: "- (D) text" holds the text.
      line = next(x for x in listed.split("\n") if x.startswith(f"- {answer} "))
      assert doc.target == line.removeprefix(f"- {answer} ").strip()
    else:
      assert doc.target == answer
    assert doc.choices[doc.gold] == doc.target
    assert "Options:" not in doc.fields.get("stem", "")


def test_prompts_equal_hand_written_ones(data_dir):
  task = tasks.find("ecqa")
  questions, pool = incontext.split_docs(task, str(data_dir))
  shown = incontext.exemplars(task, pool, 2, 0)
  assert shown == pool[:2]
  stem = lambda d: d.fields["question"].split("\nOptions:")[0]  # noqa: E731
  want = (
    f"Question: {stem(pool[0])}\nAnswer: {pool[0].target}\n\n"
    f"Question: {stem(pool[1])}\nAnswer: {pool[1].target}\n\n"
    f"Question: {stem(questions[0])}\nAnswer:"
  )
  assert incontext.context(task, shown, questions[0]) == want
  seeded = dataclasses.replace(task, sampling="seeded")
  draws = [incontext.exemplars(seeded, pool, 3, i) for i in range(4)]
  assert draws[0] == incontext.exemplars(seeded, pool, 3, 0)  # Reproducible,
  assert len({tuple(d.where for d in x) for x in draws}) > 1  # and per question.
  with pytest.raises(ConfigError, match="65 shots, but only 64 exemplars"):
    incontext.exemplars(task, pool, 65, 0)


def test_mmlu_subject_task_prompts_as_the_mmlu_benchmark(data_dir):
  """`--tasks mmlu:SUBJECT` and `--task mmlu` (`eval/mmlu.py`) ask the same question the same way:
  Hendrycks et al.'s subject line, the first k dev exemplars answered, the question."""
  task = tasks.find("mmlu:high_school_us_history")
  questions, pool = incontext.split_docs(task, str(data_dir))
  folder = data_dir / "mmlu" / "data"
  dev = mmlu.read_questions(str(folder / "dev" / "high_school_us_history_dev.csv"))
  val = mmlu.read_questions(str(folder / "val" / "high_school_us_history_val.csv"))
  assert len(questions) == len(val) and [d.target for d in questions] == [q.answer for q in val]
  for k in (0, 5):
    for i in (0, len(val) - 1):
      want = mmlu.header("high_school_us_history") + "".join(
        [*(mmlu.format_question(q, True) for q in dev[:k]), mmlu.format_question(val[i], False)]
      )
      assert incontext.context(task, incontext.exemplars(task, pool, k, i), questions[i]) == want


def test_a_yaml_task_is_the_same_task(tmp_path):
  fields = dataclasses.asdict(tasks.find("strategyqa"))
  del fields["name"]
  path = tmp_path / "my_strategyqa.yaml"
  path.write_text(json.dumps(fields))  # JSON is YAML.
  assert tasks.find(str(path)) == dataclasses.replace(
    tasks.find("strategyqa"), name="my_strategyqa"
  )
  path.write_text(json.dumps({**fields, "shot": 3}))
  with pytest.raises(ConfigError, match="unknown task keys shot"):
    tasks.find(str(path))
  path.write_text(json.dumps({**fields, "metrics": ["accuracy"]}))
  with pytest.raises(ConfigError, match="metrics"):
    tasks.find(str(path))


def test_an_answer_not_among_the_choices_names_its_line(tmp_path):
  data = tmp_path / "yn.tsv"
  data.write_text("Is it?\tyes\twhy\nIs it not?\tmaybe\twhy\n")
  task = dataclasses.replace(tasks.find("strategyqa"), data=str(data))
  with pytest.raises(DataError, match=f"{data}:2: the answer 'maybe' is not one of"):
    tasks.docs(task, str(data))
  with pytest.raises(ConfigError, match="each must be a count or k"):
    incontext.parse_shots("0,few")


def test_eval_tasks_prints_gpt3_table_and_writes_json_and_plot(data_dir, tmp_path, capsys):
  """`jaxtune eval --tasks ... --shots 0,1`: the table's cells are the JSON's accuracies, which
  are the accuracies of the recorded per-request log-likelihoods; exact match and bits per byte
  are those of the recorded generations and log-likelihoods."""
  model = data_dir / "models" / "stories260K" / "stories260K.bin"
  output = tmp_path / "out.json"
  generated = tmp_path / "yes_no.yaml"
  fields = dataclasses.asdict(tasks.find("strategyqa"))
  del fields["name"], fields["choices"]
  fields.update(data=str(data_dir / fields["data"]), metrics=["exact_match"], max_new_tokens=4)
  generated.write_text(json.dumps(fields))
  names = f"strategyqa,mmlu:astronomy,gsm8k_answer,{generated}"
  argv = ["eval", str(model), "--tasks", names, "--shots", "0,1"]
  argv += ["--limit", "4", "--data", str(data_dir), "--output", str(output)]
  argv += ["distributed.mode=disabled"]  # In this process, where JAX already runs.
  assert cli.main(argv) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["task", "metric", "k", "0-shot", "1-shot"]
  saved = json.loads(output.read_text())
  cells = saved["results"]
  assert [(c["task"], c["shots"]) for c in cells] == [
    (name, shots)
    for name in ("strategyqa", "mmlu:astronomy", "gsm8k_answer", "yes_no")
    for shots in (0, 1)
  ]
  for cell in cells[4:]:
    records = cell["records"]
    if cell["task"] == "yes_no":
      right = [r["output"].strip() == r["target"] for r in records]
      assert cell["metrics"]["exact_match"] == pytest.approx(np.mean(right))
      assert any(r["output"] for r in records)
    else:
      nats = -sum(r["loglikelihood"] for r in records)
      bits = nats / np.log(2) / sum(len(r["target"].encode()) for r in records)
      assert cell["metrics"]["bits_per_byte"] == pytest.approx(bits)
      assert 0 < bits < 20
  for cell in cells[:4]:
    records = cell["records"]
    assert len(records) == cell["metrics"]["questions"] == 4
    right = [np.argmax(r["loglikelihood"]) == r["gold"] for r in records]
    assert cell["metrics"]["acc"] == pytest.approx(np.mean(right))
    row = next(line for line in table if line.startswith(cell["task"] + " "))
    assert f"{100 * cell['metrics']['acc']:.1f}" in row.split()[3:]
  svg = output.with_suffix(".svg").read_text()
  assert svg.count("<polyline") == 4

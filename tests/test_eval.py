"""The evaluation tasks on the real stories260K model and real benchmark files, against
independent computations (PyTorch / transformers on the exported model), and their errors on
malformed files."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune import generate, sharding
from jaxtune.config import MeshConfig
from jaxtune.convert import export, hf
from jaxtune.data import answers
from jaxtune.errors import DataError
from jaxtune.eval import base, bbh, gsm8k, metrics, mmlu, runner

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def stories(data_dir):
  return jaxtune.load(data_dir / "models" / "stories260K" / "stories260K.bin")


@pytest.fixture(scope="module")
def stories_on_mesh(data_dir):
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  path = data_dir / "models" / "stories260K" / "stories260K.bin"
  return jaxtune.load(path, mesh=mesh, strategy="fsdp")


@pytest.fixture(scope="module")
def reference(stories, tmp_path_factory):
  """The same model in transformers (float32, eager attention): the independent reference."""
  folder = tmp_path_factory.mktemp("stories_hf")
  hf.save_hf(stories.config, {"params": stories.params}, folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
  return model.eval()


@pytest.fixture(scope="module")
def reference_tokenizer(stories, tmp_path_factory):
  """transformers' tokenizer of the same model as `jaxtune convert --to hf` writes it: the
  independent reference for prompts (BOS, then the text with its leading dummy-prefix space)."""
  folder = tmp_path_factory.mktemp("stories_hf_tokenizer")
  export.save_hf_tokenizer(stories.tokenizer, folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


def _torch_logprobs(reference, ids):
  """log p(ids[t + 1] | ids[: t + 1]) for each t, in float64."""
  with torch.no_grad():
    logits = reference(torch.tensor([ids[:-1]])).logits[0].double()
  return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def _mmlu_block(row, with_answer):
  text = f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:"
  return text + (f" {row[5]}\n\n" if with_answer else "")


def test_mmlu_scores_equal_transformers_on_real_questions(
  stories_on_mesh, reference, reference_tokenizer, data_dir
):
  """Each choice's log-likelihood, computed on an 8-device mesh, equals the sum of transformers'
  log-probabilities of " A" (...) after the 1-shot prompt written out here by hand and tokenized
  by transformers."""
  folder = data_dir / "mmlu" / "data"
  subjects = ("astronomy", "high_school_geography")
  options = base.Options(
    data=str(folder), split="val", subjects=subjects, shots=1, limit=3, batch_size=24
  )
  result = runner.evaluate(stories_on_mesh, "mmlu", options)
  tok = stories_on_mesh.tokenizer
  assert [e["subject"] for e in result.examples] == [s for s in subjects for _ in range(3)]
  for subject in subjects:
    dev = list(csv.reader(open(folder / "dev" / f"{subject}_dev.csv", newline="")))
    val = list(csv.reader(open(folder / "val" / f"{subject}_val.csv", newline="")))
    examples = [e for e in result.examples if e["subject"] == subject]
    for row, example in zip(val, examples, strict=False):
      about = subject.replace("_", " ")
      head = f"The following are multiple choice questions (with answers) about {about}.\n\n"
      shots = "".join(_mmlu_block(r, True) for r in dev[: example["shots"]])
      context = reference_tokenizer(head + shots + _mmlu_block(row, False)).input_ids
      for letter, score in example["loglikelihoods"].items():
        ids = context + tok.encode(f" {letter}")
        want = _torch_logprobs(reference, ids)[len(context) - 1 :].sum()
        assert score == pytest.approx(want, abs=TOLERANCE), (subject, letter)
      assert example["answer"] == row[5]
      chosen = max(example["loglikelihoods"], key=example["loglikelihoods"].get)
      assert example["predicted"] == chosen
  assert sum(e["shots"] == 1 for e in result.examples) >= 3  # Most prompts fit one exemplar.
  accuracy = [result.groups[s]["accuracy"] for s in subjects]
  assert result.metrics["accuracy_macro"] == pytest.approx(np.mean(accuracy))
  assert result.metrics["questions"] == 6


def test_perplexity_equals_transformers_on_lima(
  stories_on_mesh, reference, reference_tokenizer, data_dir
):
  """Loss on LIMA's responses (raw template: BOS, instruction, response, EOS; truncated to the
  model's 512 positions) as transformers computes it over the supervised tokens, the instruction
  tokenized by transformers (the response continues it: no dummy prefix)."""
  path = data_dir / "lima" / "lima_train_llamafactory.json"
  result = runner.evaluate(stories_on_mesh, "perplexity", base.Options(data=str(path), limit=4))
  tok = stories_on_mesh.tokenizer
  total = count = 0
  for record in json.loads(path.read_text())[:4]:
    prompt = reference_tokenizer(record["instruction"]).input_ids
    ids = [*prompt, *tok.encode(record["output"]), tok.eos_id][:513]
    if len(prompt) >= len(ids):
      continue  # Nothing of the response is left within the positions.
    logprobs = _torch_logprobs(reference, ids)
    total -= logprobs[len(prompt) - 1 :].sum()
    count += len(ids) - len(prompt)
  assert result.metrics["supervised_tokens"] == count
  assert result.metrics["loss"] == pytest.approx(total / count, abs=TOLERANCE)
  assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=TOLERANCE)


def test_generation_stats_of_greedy_responses(stories, reference_tokenizer, tmp_path):
  records = [
    {"instruction": "Once upon a time", "output": "there was a cat.", "generator": "ref"},
    {"instruction": "Tell me about the dog", "input": "", "output": "", "generator": "ref"},
    {"instruction": "Lily went to the park", "output": "She saw a big ball.", "generator": "ref"},
  ]
  path = tmp_path / "alpaca_eval.json"
  path.write_text(json.dumps(records))
  options = base.Options(
    data=str(path), max_new_tokens=24, repetition_penalty=1.2, generator="stories"
  )
  result = runner.evaluate(stories, "generation-stats", options)
  assert result.metrics["skipped_records"] == 1  # The empty reference.
  tok = stories.tokenizer
  kept = [records[0], records[2]]
  sampling = generate.Sampling(max_new_tokens=24, repetition_penalty=1.2)
  outs = stories.generate([reference_tokenizer(r["instruction"]).input_ids for r in kept], sampling)
  responses = [tok.decode(o.ids).strip() for o in outs]
  assert [e["output"] for e in result.examples] == responses
  assert [(e["instruction"], e["generator"]) for e in result.examples] == [
    (r["instruction"], "stories") for r in kept
  ]
  want = {
    **metrics.generation_stats(responses),
    **metrics.reference_scores(responses, [r["output"] for r in kept]),
  }
  for key, value in want.items():
    assert result.metrics[key] == pytest.approx(value, nan_ok=True), key


def test_gsm8k_prompt_and_scoring(stories, data_dir):
  path = data_dir / "gsm8k" / "train.jsonl"
  (first,) = gsm8k.read_problems(str(path))[:1]
  assert gsm8k.exemplar(first) == (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\n"
    "Answer: Natalia sold 48/2 = 24 clips in May.\n"
    "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\n\n"
  )
  options = base.Options(
    data=str(path), exemplars=str(path), shots=1, limit=2, max_new_tokens=32, batch_size=2
  )
  result = runner.evaluate(stories, "gsm8k", options)
  assert [e["answer"] for e in result.examples] == ["72", "10"]
  for e in result.examples:
    assert e["predicted"] == answers.final_number(e["output"])
    assert e["correct"] == (e["predicted"] == e["answer"])
    assert "\n\n" not in e["output"] and "Question:" not in e["output"]  # Cut at the stops.
  assert result.metrics["exact_match"] == np.mean([e["correct"] for e in result.examples])


@pytest.mark.parametrize(
  "text, answer",
  [
    ("She sold 5.\n#### 1,000", "1000"),
    ("So the answer is 42.", "42"),
    ("The answer is: $7.50", "7.5"),
    ("3 apples and 5 pears", "5"),
    ("no number", ""),
  ],
)
def test_gsm8k_answer_extraction(text, answer):
  assert answers.final_number(text) == answer


def test_bbh_prompts_and_scoring(stories, data_dir):
  description, exemplars = bbh.read_prompt(
    str(data_dir / "bbh" / "cot-prompts" / "object_counting.txt")
  )
  assert description == (
    "Questions that involve enumerating objects and asking the model to count them."
  )
  assert len(exemplars) == 3 and all(e.startswith("Q: I have ") for e in exemplars)
  assert [bbh.extract_answer(e) for e in exemplars] == ["6", "11", "8"]
  options = base.Options(
    data=str(data_dir / "bbh" / "bbh"),
    subjects=("boolean_expressions", "object_counting"),
    limit=2,
    max_new_tokens=32,
  )
  result = runner.evaluate(stories, "bbh", options)
  assert sorted(result.groups) == ["boolean_expressions", "object_counting"]
  targets = [e["target"] for e in result.examples]
  real = json.loads((data_dir / "bbh" / "bbh" / "object_counting.json").read_text())["examples"]
  assert targets[2:] == [x["target"] for x in real[:2]]
  for e in result.examples:
    assert e["predicted"] == bbh.extract_answer(e["output"])
    assert e["correct"] == (e["predicted"] == e["target"])
  table = runner.table(result)
  assert "object_counting" in table and "exact_match_macro" in table


def test_bbh_answer_extraction():
  assert bbh.extract_answer("... So the answer is (B).") == "(B)"
  assert bbh.extract_answer("the answer is } ] >.\nQ: next") == "} ] >"
  assert bbh.extract_answer("I think the answer is no. So the answer is Yes.") == "Yes"
  assert bbh.extract_answer("nothing") == ""


# Malformed files: each error names the file and the line.


def test_malformed_mmlu_csv(tmp_path):
  path = tmp_path / "bad_val.csv"
  path.write_text('"A question\nover two lines",1,2,3,4,A\nq,1,2,3,4\nq,1,2,3,4,E\n')
  with pytest.raises(DataError, match=rf"{path}:3: 5 columns, expected 6"):
    mmlu.read_questions(str(path))
  path.write_text('"A question\nover two lines",1,2,3,4,A\nq,1,2,3,4,E\n')
  with pytest.raises(DataError, match=rf"{path}:3: answer 'E' is not one of A, B, C, D"):
    mmlu.read_questions(str(path))
  with pytest.raises(DataError, match=r"no such folder: MMLU's 'test' split"):
    mmlu.run(None, base.Options(data=str(tmp_path)))


def test_malformed_gsm8k_jsonl(tmp_path):
  path = tmp_path / "test.jsonl"
  good = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})
  path.write_text(f"{good}\n{{not json\n")
  with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
    gsm8k.read_problems(str(path))
  path.write_text(f"{good}\n\n" + json.dumps({"question": "q", "answer": "no final line"}))
  with pytest.raises(DataError, match=rf"{path}:3: field 'answer': no final answer"):
    gsm8k.read_problems(str(path))
  path.write_text(json.dumps({"question": "q"}))
  with pytest.raises(DataError, match=rf"{path}:1: field 'answer': missing"):
    gsm8k.read_problems(str(path))


def test_malformed_bbh_json(tmp_path):
  path = tmp_path / "task.json"
  path.write_text(
    '{"canary": "x",\n "examples": [\n  {"input": "a", "target": "b"},\n'
    '  {"input": "c",\n   "target": "d"},\n  {"input": "e"}\n]}\n'
  )
  with pytest.raises(DataError, match=rf"{path}:6: field 'target': missing"):
    bbh.read_examples(str(path))
  path.write_text('{"examples": [\n  {"input": "a", "target": "b"},\n  oops\n]}')
  with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
    bbh.read_examples(str(path))
  prompt = tmp_path / "task.txt"
  prompt.write_text("canary only\nQ: a\nA: b")
  with pytest.raises(DataError, match=rf"{prompt}: no '-----' line"):
    bbh.read_prompt(str(prompt))


def test_malformed_instruction_data(stories, tmp_path):
  path = tmp_path / "eval.jsonl"
  path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": " "}\n')
  with pytest.raises(DataError, match=rf"{path}:2: field 'output': empty"):
    runner.evaluate(stories, "perplexity", base.Options(data=str(path)))


def test_saved_json_has_no_nan(tmp_path):
  result = base.Result("t", {"x": math.nan, "y": 1.5}, {}, [{"z": math.inf}])
  runner.save(result, str(tmp_path / "out" / "t.json"), checkpoint="c")
  saved = json.loads((tmp_path / "out" / "t.json").read_text())
  assert saved == {
    "checkpoint": "c",
    "task": "t",
    "metrics": {"x": None, "y": 1.5},
    "groups": {},
    "examples": [{"z": None}],
  }

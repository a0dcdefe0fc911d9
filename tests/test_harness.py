"""`JaxtuneLM` against lm-evaluation-harness's own Hugging Face backend (`--model hf`), on the
real stories260K model (`jaxtune convert stories260K.bin DST --to hf` for the harness, the
llama2.c file for jaxtune, on an 8-device mesh) and local tasks built from MMLU's dev/val CSVs:
every request's log-likelihood within 1e-4, the same multiple-choice predictions, the same
greedy generations and rolling log-likelihoods."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from jaxtune import cli, sharding
from jaxtune.config import MeshConfig
from jaxtune.eval import incontext
from jaxtune.eval import tasks as task_defs

try:
  import lm_eval
except ImportError:
  if os.environ.get("CI") == "true":  # CI installs the test extra, which has the harness.
    raise
  pytest.skip("the harness extra: pip install 'jaxtune[harness]'", allow_module_level=True)

TOLERANCE = 1e-4
SUBJECTS = ("astronomy",)
QUESTIONS = 3

_CHOICE = """\
task: jt_mmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files: {{validation: {folder}/{subject}_val.jsonl, dev: {folder}/{subject}_dev.jsonl}}
  cache_dir: {folder}/cache
validation_split: validation
fewshot_split: dev
fewshot_config: {{sampler: first_n}}
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
doc_to_text: "{{{{question}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\
C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""

_GENERATE = """\
task: jt_mmlu_generate
dataset_path: json
dataset_kwargs:
  data_files: {{validation: {folder}/astronomy_val.jsonl}}
  cache_dir: {folder}/cache
validation_split: validation
output_type: generate_until
doc_to_text: "Question: {{{{question.strip()}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs: {{until: ["\\n", "Question:"], do_sample: false, max_gen_toks: 16}}
metric_list: [{{metric: exact_match}}]
"""

_ROLLING = """\
task: jt_mmlu_rolling
dataset_path: json
dataset_kwargs:
  data_files: {{validation: {folder}/astronomy_val.jsonl}}
  cache_dir: {folder}/cache
validation_split: validation
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{choices | join(' ')}}}}"
metric_list: [{{metric: word_perplexity}}]
"""


@pytest.fixture(scope="module")
def tasks(data_dir, tmp_path_factory):
  """Local harness tasks (their YAML and JSONL files) from a few MMLU questions, the multiple
  choice one prompted as jaxtune's `mmlu:SUBJECT` task prompts."""
  folder = tmp_path_factory.mktemp("harness_tasks")
  for subject in SUBJECTS:
    for split, n in (("val", QUESTIONS), ("dev", 5)):
      with open(data_dir / "mmlu" / "data" / split / f"{subject}_{split}.csv", newline="") as f:
        rows = list(csv.reader(f))[:n]
      with open(folder / f"{subject}_{split}.jsonl", "w") as f:
        for r in rows:
          record = {"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])}
          f.write(json.dumps(record) + "\n")
    (folder / f"jt_mmlu_{subject}.yaml").write_text(_CHOICE.format(subject=subject, folder=folder))
  (folder / "jt_mmlu_generate.yaml").write_text(_GENERATE.format(folder=folder))
  (folder / "jt_mmlu_rolling.yaml").write_text(_ROLLING.format(folder=folder))
  return folder


def _samples(model, model_args, tasks, names, shots):
  """Per task, its logged samples in document order; and the harness's results."""
  from lm_eval.tasks import TaskManager

  out = lm_eval.simple_evaluate(
    model=model,
    model_args=model_args,
    tasks=list(names),
    num_fewshot=shots,
    task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    log_samples=True,
    batch_size=8,
    verbosity="WARNING",
  )
  return {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in names}, out[
    "results"
  ]


def test_jaxtune_lm_equals_the_harness_hf_backend(data_dir, tasks, tmp_path):
  from jaxtune.eval.harness import JaxtuneLM

  bin_path = data_dir / "models" / "stories260K" / "stories260K.bin"
  hf_path = tmp_path / "stories_hf"
  assert cli.main(["convert", str(bin_path), str(hf_path), "--to", "hf"]) == 0
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  ours = JaxtuneLM(str(bin_path), mesh=mesh, batch_size=2)
  names = [f"jt_mmlu_{s}" for s in SUBJECTS] + ["jt_mmlu_generate", "jt_mmlu_rolling"]
  mine, my_results = _samples(ours, None, tasks, names, 1)
  hf_args = {"pretrained": str(hf_path), "dtype": "float32", "device": "cpu"}
  theirs, their_results = _samples("hf", hf_args, tasks, names, 1)
  for name in names:
    assert len(mine[name]) == len(theirs[name]) == QUESTIONS, name
    for a, b in zip(mine[name], theirs[name], strict=True):
      assert a["arguments"] == b["arguments"], (name, a["doc_id"])
      if name == "jt_mmlu_generate":
        assert a["filtered_resps"] == b["filtered_resps"], (name, a["doc_id"])
        assert a["filtered_resps"][0].strip(), "an empty generation proves little"
        continue
      ll_a = np.asarray([r[0][0] if isinstance(r[0], list | tuple) else r[0] for r in a["resps"]])
      ll_b = np.asarray([r[0][0] if isinstance(r[0], list | tuple) else r[0] for r in b["resps"]])
      np.testing.assert_allclose(ll_a, ll_b, atol=TOLERANCE, rtol=0, err_msg=name)
      if name != "jt_mmlu_rolling":
        greedy_a = [r[0][1] for r in a["resps"]]
        greedy_b = [r[0][1] for r in b["resps"]]
        assert greedy_a == greedy_b, (name, a["doc_id"])
        assert np.argmax(ll_a) == np.argmax(ll_b), (name, a["doc_id"])
    for metric, value in their_results[name].items():
      if isinstance(value, float) and "stderr" not in metric:
        assert my_results[name][metric] == pytest.approx(value, rel=1e-5, abs=1e-4), (name, metric)

  # jaxtune's own in-context run of the same MMLU task scores the same requests.
  task = dataclasses.replace(task_defs.find(f"mmlu:{SUBJECTS[0]}"), limit=QUESTIONS)
  cell = incontext.run(ours.model, task, 1, str(data_dir), 2)
  for record, sample in zip(cell.records, theirs[f"jt_mmlu_{SUBJECTS[0]}"], strict=True):
    assert [(record["context"], " " + c) for c in record["choices"]] == [
      tuple(a) for a in sample["arguments"]
    ]
    ll = np.asarray([r[0][0] for r in sample["resps"]])
    np.testing.assert_allclose(record["loglikelihood"], ll, atol=TOLERANCE, rtol=0)
    assert record["predicted"]["acc"] == np.argmax(ll)
  assert cell.metrics["acc"] == pytest.approx(their_results[f"jt_mmlu_{SUBJECTS[0]}"]["acc,none"])

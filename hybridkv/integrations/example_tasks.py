"""Offline task folders for lm-eval and lmms-eval over hybridkv's own prompts.

A folder holds the documents as JSON lines, the task YAML and its ``utils.py``; the harness finds
it through ``--include_path``. ``benchmarks/harness_tasks.py`` writes the two example tasks and
the tests write the same visual task, so a harness score is computed by the code the benchmark
ships.

- needle (lm-eval ``generate_until``): hybridkv's pass-key prompts, scored as ``hybridkv eval``
  scores them (the first number of the answer is the key);
- visual (lmms-eval): the visual task generator's questions; the images are regenerated from each
  document's kind, seed and image count, so the folder holds no image files; scored as
  ``hybridkv eval`` scores them (:func:`hybridkv.data.visual_eval.answer_matches`).
"""

from __future__ import annotations

import json
from pathlib import Path

NEEDLE_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""

NEEDLE_UTILS = """\
from hybridkv.data.text_tasks import answer_correct


def process_results(doc, results):
    return {"accuracy": float(answer_correct(results[0], doc["answer"]))}
"""

VISUAL_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 2
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""

VISUAL_UTILS = """\
from hybridkv.data.visual_eval import answer_matches
from hybridkv.data.visual_tasks import make_sample


def doc_to_visual(doc):
    images = doc["images"] if doc["kind"] == "needle" else None
    return make_sample(doc["kind"], doc["seed"], num_images=images).images()


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(answer_matches(results[0], doc["answer"]))}
"""


def write_task(folder: Path, yaml: str, utils: str, docs: list[dict]) -> Path:
    """Write one task folder named after its task (documents, ``<name>.yaml``, ``utils.py``); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{folder.name}.yaml").write_text(yaml.format(name=folder.name, data=data.resolve()))
    (folder / "utils.py").write_text(utils)
    return folder


def visual_docs(tasks) -> list[dict]:
    """The documents of :class:`hybridkv.data.visual_eval.VisualTask` s (kind, seed, images, question, answer)."""
    return [{"kind": t.sample.task, "seed": t.sample.seed, "images": len(t.sample.scenes), "question": t.sample.question,
             "answer": t.answer} for t in tasks]

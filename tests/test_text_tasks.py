"""Long-text tasks: deterministic, the needle really inside, the question span right."""

import pytest

from hybridkv.data.text_tasks import TextTaskBuilder, corpus_text


class CharTokenizer:
    """One id per character: a tokenizer whose behaviour the test can reason about exactly."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_needle_task_is_deterministic_and_holds_its_key():
    builder = TextTaskBuilder(CharTokenizer())
    a, b = builder.needle(3000, 0.3, 7), builder.needle(3000, 0.3, 7)
    assert a.answer == b.answer and a.input_ids.equal(b.input_ids)
    text = CharTokenizer().decode(a.input_ids[0].tolist())
    assert f"The pass key is {a.answer}." in text
    assert abs(text.index(a.answer) / len(text) - 0.3) < 0.05
    question = CharTokenizer().decode(a.input_ids[0, -a.query_tokens :].tolist())
    assert question.startswith("\n\nQuestion: What is the pass key?")
    assert builder.needle(3000, 0.3, 8).answer != a.answer or builder.needle(3000, 0.3, 8).input_ids.ne(a.input_ids).any()


def test_multi_key_task_asks_one_of_its_codes():
    task = TextTaskBuilder(CharTokenizer()).multi_key(4000, 0.7, 1, keys=4)
    text = CharTokenizer().decode(task.input_ids[0].tolist())
    assert text.rsplit("Question:", 1)[0].count("The code for ") == 4
    name = text.rsplit("What is the code for ", 1)[1].split("?")[0]
    assert f"The code for {name} is {task.answer}." in text


def test_length_beyond_corpus_and_missing_directory(tmp_path):
    builder = TextTaskBuilder(CharTokenizer())
    with pytest.raises(ValueError, match="exceeds the corpus"):
        builder.needle(len(corpus_text()) + 10, 0.5, 0)
    with pytest.raises(FileNotFoundError, match="base-files"):
        corpus_text(tmp_path / "nothing")

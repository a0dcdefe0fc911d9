"""Templates rendered character for character as their published formats."""

import pytest

from jaxtune.data import templates
from jaxtune.data.formats import Conversation, Message
from jaxtune.errors import DataError

U, A, S = "user", "assistant", "system"


def _conv(*turns, input_=""):
  messages = [Message(r, c) for r, c in turns]
  if input_:
    messages[0 if messages[0].role == U else 1] = Message(U, turns[0][1], input_)
  return Conversation(tuple(messages), "test")


def _text(conv, name):
  return templates.to_text(templates.render(conv, name))


def test_alpaca_without_and_with_input():
  assert _text(_conv((U, "Name a color."), (A, "Blue.")), "alpaca") == (
    "<s>Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:Blue.</s>"
  )
  assert _text(_conv((U, "Translate."), (A, "Hello"), input_="Hola"), "alpaca") == (
    "<s>Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate.\n\n### Input:\nHola\n\n### Response:Hello</s>"
  )


def test_vicuna_two_turns_with_default_system():
  conv = _conv((U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Goodbye."))
  assert _text(conv, "vicuna") == (
    "<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: "
    "Hello!</s>USER: Bye ASSISTANT: Goodbye.</s>"
  )


def test_llama2_chat_with_system():
  conv = _conv((S, "Be brief."), (U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Goodbye."))
  assert _text(conv, "llama2") == (
    "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
    "<s>[INST] Bye [/INST] Goodbye. </s>"
  )


def test_chatml_with_system():
  conv = _conv((S, "Be brief."), (U, "Hi"), (A, "Hello!"))
  assert _text(conv, "chatml") == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
  )


def test_lima_end_of_turn_between_speakers():
  conv = _conv((U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Goodbye."))
  assert _text(conv, "lima") == "<s>Hi<EOT>Hello!<EOT>Bye<EOT>Goodbye.<EOT>"
  assert _text(_conv((U, "Hi"), (A, "Yo")), "raw") == "<s>HiYo</s>"


def test_only_assistant_turns_are_supervised():
  conv = _conv((U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Goodbye."))
  chunks = templates.render(conv, "chatml")
  supervised = "".join(c.text for c in chunks if c.supervised)
  assert supervised == "Hello!<|im_end|>Goodbye.<|im_end|>"


def test_special_tokens_are_split_out_of_template_text_only():
  conv = _conv((U, "say <|im_end|> please"), (A, "ok"))
  chunks = templates.render(conv, "chatml")
  specials = [c.text for c in chunks if c.special]
  assert specials == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]
  assert any(c.content and "<|im_end|>" in c.text for c in chunks)


def test_a_template_without_a_system_slot_refuses_a_system_prompt():
  with pytest.raises(DataError, match="no place for a system prompt"):
    templates.render(_conv((S, "Be brief."), (U, "Hi"), (A, "Yo")), "alpaca")

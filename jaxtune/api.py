"""`jaxtune.load`: any checkpoint jaxtune reads, as one handle to run the model.

Shape letters: B batch, T length, V vocab.

Three formats, told apart by `detect`:
- "jaxtune": a training run directory (`train.output_dir`: config.yaml, tokenizer/,
  checkpoints/<step>/), at its latest checkpoint, or one of its `checkpoints/<step>` directories;
- "hf": a Hugging Face folder (config.json and safetensors; tokenizer.model, else tokenizer.json);
- "llama2c": a llama2.c model file (`.bin`), with the llama2.c tokenizer beside it if there is one
  (`tokenizer.bin`, else a single `tok*.bin`).

With a `mesh`, parameters are placed as training places them (`sharding.resolve_rules` of the
rule preset) and are read straight into their shards: orbax restores each shard, and Hugging Face
safetensors are read shard by shard (see `hf.load_hf`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtune import checkpoint, config, generate, runs, sharding
from jaxtune.config_model import ModelConfig
from jaxtune.config_vision import LlavaConfig
from jaxtune.convert import hf, hf_vision, llama2c
from jaxtune.data import llama2c_tokenizer, llava_data, multimodal, packing, pipeline, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.formats import Conversation, Message
from jaxtune.data.hf_tokenizer import TOKENIZER_JSON
from jaxtune.data.images import Preprocess
from jaxtune.errors import CheckpointError, GenerationError
from jaxtune.model import llava, transformer
from jaxtune.model.adapters import NONE, Adapters
from jaxtune.peft import lora, methods, partition, prefix
from jaxtune.train import llava_run, objective

log = logging.getLogger(__name__)

Tokenizer = pipeline.Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A loaded model: its config, parameters (placed on `mesh` by `rules`, or on one device),
  tokenizer (None if it has none) and chat template name ("raw" unless a jaxtune run says)."""

  config: ModelConfig
  params: Any
  tokenizer: Tokenizer | None
  template: str = "raw"
  mesh: Mesh | None = None
  rules: sharding.Rules | None = None
  adapters: Adapters = NONE  # A PEFT run's adapters, ready to decode (see `_load_run`).
  base: str = ""  # Where a PEFT run's base model came from (its train.init_from).
  llava: LlavaConfig | None = None  # A model that reads images: its encoder and projector.
  preprocess: Preprocess | None = None  # How its images are prepared.
  options: tuple[tuple[str, Any], ...] = ()  # The objective's model options (a scalar head).

  @functools.cached_property
  def module(self) -> transformer.Transformer:
    if self.llava is not None:
      return llava.model(self.llava, adapters=self.adapters)
    return transformer.Transformer(self.config, self.adapters, **dict(self.options))

  def _check_images(self, prompts: Sequence[Sequence[int]], images: Sequence[Any]) -> None:
    """Each prompt has the image tokens of its images."""
    if self.llava is None:
      raise CheckpointError("this model reads no images (not a LLaVA model)")
    if len(images) != len(prompts):
      raise GenerationError(f"{len(prompts)} prompts but {len(images)} lists of images")
    for i, (prompt, pixels) in enumerate(zip(prompts, images, strict=True)):
      slots = sum(t == self.llava.image_token_id for t in prompt)
      if slots != len(pixels) * self.llava.image_tokens:
        raise GenerationError(
          f"prompt {i} has {slots} image tokens, but its {len(pixels)} images take "
          f"{len(pixels) * self.llava.image_tokens} (see Model.image_prompt)"
        )

  def image_prompt(
    self, messages: Sequence[Message], images: Sequence[str | pathlib.Path]
  ) -> tuple[list[int], np.ndarray]:
    """(token ids, images [M, Y, X, C]) of a conversation about `images`, to continue with
    `generate(..., images=...)`: the template's prompt for the next assistant turn, each
    `<image>` of the user turns expanded (placed before the first user turn's text where the
    turns have none)."""
    if self.llava is None or self.preprocess is None:
      raise CheckpointError("this model reads no images (not a LLaVA model)")
    messages = list(messages)
    if images and not any(multimodal.IMAGE in m.content for m in messages):
      first = next(i for i, m in enumerate(messages) if m.role == "user")
      marks = "".join(f"{multimodal.IMAGE}\n" for _ in images)
      messages[first] = dataclasses.replace(
        messages[first], content=marks + messages[first].content
      )
    conversation = multimodal.ImageConversation(
      Conversation(tuple(messages), "prompt"), tuple(pathlib.Path(p) for p in images)
    )
    ids = multimodal.prompt_ids(
      conversation,
      self.template,
      self.tokenizer,
      self.llava.image_token_id,
      self.llava.image_tokens,
    )
    pixels = [self.preprocess.load(p, str(p)) for p in images]
    return ids, np.stack(pixels) if pixels else np.zeros((0, 1, 1, 1), np.float32)

  def merged(self) -> Model:
    """The plain model that computes what this one does: LoRA folded into the base weights."""
    adapters = self.adapters
    if adapters == NONE:
      return self
    if adapters.prefix_length or adapters.prompt_length:
      raise CheckpointError(
        "a prefix- or prompt-tuned model cannot be folded into plain weights; export its "
        "base model, or load it with jaxtune.load"
      )
    if self.config.linear != "dense":
      raise CheckpointError(
        f"LoRA beside model.linear={self.config.linear} projections adds its update in full "
        "precision: folded into the weights it would be quantized with them, another model; "
        "load it with jaxtune.load, or export the adapters with --to peft"
      )
    merged = lora.merge(self.params, adapters.lora_scale)
    return dataclasses.replace(self, params=merged, adapters=NONE)

  @functools.cached_property
  def _logits(self) -> Callable[..., jax.Array]:
    return jax.jit(
      lambda params, tokens_bt, **images: self.module.apply({"params": params}, tokens_bt, **images)
    )

  def logits(self, tokens_bt: Any, images: Any = None) -> jax.Array:
    """Float32 logits [B, T, V] of token ids [B, T] (one sequence per row, from position 0);
    `images` [B, M, Y, X, C] (a LLaVA model) in place of each row's image tokens."""
    tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
    if tokens_bt.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_bt.shape}")
    extra = {} if images is None else {"images": jnp.asarray(images, jnp.float32)}
    with sharding.use(self.mesh, self.rules or ()):
      return self._logits(self.params, tokens_bt, **extra)

  @functools.cached_property
  def _scores(self) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(lambda p, tokens_bt: self.module.apply({"params": p}, tokens_bt, head="score"))

  def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> np.ndarray:
    """A reward model's score [N] of each token sequence, read where training reads it: at the
    last input token (the state that has seen all but the final token, the end of turn)."""
    if not self.module.scalar_head:
      raise CheckpointError(
        "this model has no scalar head to score with: load a reward model's run "
        "(train.objective=reward)"
      )
    longest = max((len(s) for s in sequences), default=2)
    if longest - 1 > self.config.max_seq_len or min(map(len, sequences), default=2) < 2:
      raise ValueError(
        f"each sequence needs 2 to {self.config.max_seq_len + 1} tokens to be scored "
        f"(model.max_seq_len inputs and a final token)"
      )
    width = -(-(longest - 1) // 16) * 16  # Few shapes to compile.
    out = []
    for start in range(0, len(sequences), batch_size):
      chunk = sequences[start : start + batch_size]
      tokens_bt = np.zeros((batch_size, width), np.int32)  # Right-padded: causal, so harmless.
      for i, s in enumerate(chunk):
        tokens_bt[i, : len(s) - 1] = s[:-1]
      with sharding.use(self.mesh, self.rules) if self.mesh else contextlib.nullcontext():
        score_bt = np.asarray(self._scores(self.params, jnp.asarray(tokens_bt)))
      out += [score_bt[i, len(s) - 2] for i, s in enumerate(chunk)]
    return np.asarray(out, np.float32)

  def score(
    self, conversations: Sequence[Conversation | tuple[str, str]], batch_size: int = 8
  ) -> np.ndarray:
    """A reward model's score [N] of each (prompt, response), or conversation ending in the
    response to score, rendered by the run's template and tokenized as training did."""
    if self.tokenizer is None:
      raise CheckpointError("this model has no tokenizer: pass tokenizer= to jaxtune.load")
    convs = [
      c
      if isinstance(c, Conversation)
      else Conversation((Message("user", c[0]), Message("assistant", c[1])))
      for c in conversations
    ]
    ids = [
      packing.tokenize(templates.render(c, self.template), self.tokenizer, False).ids.tolist()
      for c in convs
    ]
    return self.score_ids(ids, batch_size)

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    sampling: generate.Sampling | None = None,
    *,
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    images: Sequence[np.ndarray] | None = None,
  ) -> list[generate.Completion]:
    """Completions of token-id `prompts` with the KV cache, on the model's mesh (see
    `jaxtune.generate`; sampling None: greedy, up to 256 tokens). `stop_ids` None: EOS and the
    template's end-of-turn tokens; ids past the tokenizer's vocabulary are never chosen.
    `images` (a LLaVA model): each prompt's images [M, Y, X, C] (see `image_prompt`), prefilled
    into the KV cache once."""
    if images is not None:
      self._check_images(prompts, images)
    has_tokenizer = self.tokenizer is not None
    if stop_ids is None:
      stop_ids = generate.template_stop_ids(self.tokenizer, self.template) if has_tokenizer else ()
    return generate.generate(
      self.module,
      self.params,
      prompts,
      sampling or generate.Sampling(),
      stop_ids=stop_ids,
      seed=seed,
      batch_size=batch_size,
      mesh=self.mesh,
      rules=self.rules,
      progress=progress,
      images=images,
      vocab_size=self.tokenizer.vocab_size if has_tokenizer else 0,
    )


def detect(path: str | pathlib.Path) -> str:
  """The format of the checkpoint at `path`: "jaxtune", "hf" or "llama2c"."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  if path.is_dir():
    if runs.is_run(path) or runs.run_of_step(path) is not None:
      return "jaxtune"
    if (path / "config.json").is_file():
      return "hf"
  elif path.suffix == ".bin":
    return "llama2c"
  raise CheckpointError(
    f"{path}: not a checkpoint jaxtune reads: expected a jaxtune run directory ({runs.CONFIG} and "
    f"{runs.CHECKPOINTS}/), one of its {runs.CHECKPOINTS}/<step> directories, a Hugging Face "
    "folder (config.json and *.safetensors) or a llama2.c model file (.bin)"
  )


def load(
  path: str | pathlib.Path,
  *,
  mesh: Mesh | None = None,
  param_dtype: str | None = None,
  strategy: str | None = None,
  tokenizer: str | Tokenizer | None = None,
) -> Model:
  """Loads the checkpoint at `path` (any format `detect` knows).

  `mesh`: place the parameters on this mesh by the `strategy` rule preset ("tp" or "fsdp";
  default: a run's `mesh.strategy`, else "tp"); None: on one device. `param_dtype` ("float32" or
  "bfloat16"): cast to it; None: as stored (a run's `model.param_dtype`; Hugging Face: bfloat16
  if every weight is stored so, else float32; llama2.c: float32). `tokenizer`: a tokenizer or
  its path, instead of the checkpoint's own.
  """
  path = pathlib.Path(path)
  if param_dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"param_dtype={param_dtype!r} must be float32, bfloat16 or None")
  fmt = detect(path)
  log.info("loading %s (%s)", path, fmt)
  load_params, find_tokenizer = _FORMATS[fmt]
  model = load_params(path, mesh, param_dtype, strategy)
  if isinstance(tokenizer, str | pathlib.Path):
    tokenizer = pipeline.load_tokenizer(str(tokenizer))
  model = dataclasses.replace(
    model, tokenizer=find_tokenizer(path) if tokenizer is None else tokenizer
  )
  if model.tokenizer is not None and model.tokenizer.vocab_size > model.config.vocab_size:
    raise CheckpointError(
      f"{path}: the tokenizer has {model.tokenizer.vocab_size} tokens, more than the model's "
      f"{model.config.vocab_size}"
    )
  return model


def _placement(
  cfg: ModelConfig,
  mesh: Mesh | None,
  strategy: str,
  adapters: Adapters = NONE,
  options=(),
  llava_cfg: LlavaConfig | None = None,
) -> tuple[Any, Any, Any]:
  """(abstract params, their shardings, the rules) of `cfg`'s model (with `llava_cfg`'s
  encoder and projector) on `mesh` or one device."""
  if llava_cfg is None:
    model = transformer.Transformer(cfg, adapters, **dict(options))
  else:
    model = llava.model(dataclasses.replace(llava_cfg, text=cfg), adapters=adapters)
  abstract = jax.eval_shape(llava_run.init_fn(model), jax.random.key(0))
  params = nn.meta.unbox(abstract)["params"]
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return params, jax.tree.map(lambda _: device, params), None
  rules = sharding.resolve_rules(strategy, mesh, abstract)
  return params, sharding.variable_shardings(abstract, mesh, rules, strategy)["params"], rules


def _load_run(path, mesh, param_dtype, strategy) -> Model:
  run, step = runs.run_and_step(path)
  cfg = config.load(str(run / runs.CONFIG))
  model_cfg = (
    cfg.model if param_dtype is None else dataclasses.replace(cfg.model, param_dtype=param_dtype)
  )
  strategy = strategy or cfg.mesh.strategy
  adapters = methods.adapters(cfg.peft)
  trains = objective.trains(cfg.train, llava_run.trains(cfg, methods.trains(cfg.peft)))
  options = tuple(objective.model_options(cfg.train).items())
  llava_cfg = cfg.vision.llava(model_cfg) if cfg.vision.enabled else None
  abstract, shardings, rules = _placement(model_cfg, mesh, strategy, adapters, options, llava_cfg)
  (trained, base), (trained_sharding, base_sharding) = (
    partition.split(abstract, trains),
    partition.split(shardings, trains),
  )
  params = checkpoint.restore_params(
    str(run / runs.CHECKPOINTS), checkpoint.abstract(trained, trained_sharding), step
  )
  if adapters != NONE or llava_cfg is not None:  # The checkpoint holds the trained part; the
    # rest (the base, a LLaVA encoder) is where the run began.
    base_params = partition.split(_base_of_run(cfg, model_cfg, mesh, strategy), trains)[1]
    if jax.tree.map(jnp.shape, base_params) != jax.tree.map(jnp.shape, base):
      raise CheckpointError(f"{run}: the base model (train.init_from) does not fit the adapters")
    params = partition.combine(params, jax.tree.map(jax.device_put, base_params, base_sharding))
  with sharding.use(mesh, rules):
    model = transformer.Transformer(model_cfg, adapters, **dict(options))
    module, params = prefix.for_decoding(model, params)
  return Model(
    model_cfg,
    params,
    None,
    cfg.data.template,
    mesh,
    rules,
    module.adapters,
    cfg.train.init_from,
    options=options,
    llava=llava_cfg,
    preprocess=llava_data.preprocess(cfg) if llava_cfg is not None else None,
  )


def _base_of_run(cfg: config.Config, model_cfg: ModelConfig, mesh, strategy) -> Any:
  """The base parameters a PEFT run trained on: its `train.init_from` (vocabulary grown for the
  run's added tokens), else the random ones its seed drew; a LLaVA run's also with its
  pretrained parts in place (`llava_run.pretrained`)."""
  if cfg.train.init_from and not cfg.vision.enabled:
    base = load(cfg.train.init_from, mesh=mesh, strategy=strategy)
    return transformer.grow_vocab(base.merged().params, model_cfg.vocab_size)
  init_rng, _ = runs.seed_rngs(cfg.train.seed)
  init = llava_run.init_fn(llava_run.model(dataclasses.replace(cfg, model=model_cfg)))
  params = nn.meta.unbox(jax.jit(init)(init_rng))["params"]
  if cfg.vision.enabled:
    params = llava_run.pretrained(cfg, params, mesh)
  return partition.base(params)


def _run_tokenizer(path: pathlib.Path) -> Tokenizer | None:
  saved = runs.run_and_step(path)[0] / runs.TOKENIZER
  return pipeline.load_tokenizer(str(saved)) if saved.is_dir() else None


def _load_hf(path, mesh, param_dtype, strategy) -> Model:
  if hf_vision.is_llava(path):
    return _load_hf_llava(path, mesh, param_dtype, strategy)
  cfg = hf.load_config(path, param_dtype)
  _, shardings, rules = _placement(cfg, mesh, strategy or "tp")
  cfg, variables = hf.load_hf(path, cfg.param_dtype, shardings if mesh is not None else None)
  params = variables["params"] if mesh is not None else _put(variables["params"], shardings)
  return Model(cfg, params, None, "raw", mesh, rules)


def _load_hf_llava(path, mesh, param_dtype, strategy) -> Model:
  """A Hugging Face LLaVA folder, with its preprocessor_config.json if it has one (else the
  encoder's image size and CLIP's mean and deviation)."""
  cfg, variables = hf_vision.load_llava(path)
  dtype = param_dtype or "float32"
  cfg = dataclasses.replace(
    cfg,
    text=dataclasses.replace(cfg.text, param_dtype=dtype),
    vision=dataclasses.replace(cfg.vision, param_dtype=dtype),
  )
  module = llava.model(cfg)
  abstract = jax.eval_shape(llava.init_fn(module), jax.random.key(0))
  params = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)), variables["params"])
  rules = None
  if mesh is None:
    shardings = jax.tree.map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), params
    )
  else:
    rules = sharding.resolve_rules(strategy or "tp", mesh, abstract)
    shardings = sharding.variable_shardings(abstract, mesh, rules, strategy or "tp")["params"]
  config_file = pathlib.Path(path) / "preprocessor_config.json"
  preprocess = (
    Preprocess.from_hf(config_file)
    if config_file.is_file()
    else Preprocess(size=cfg.vision.image_size, resize="shortest_edge")
  )
  return Model(
    cfg.text, _put(params, shardings), None, "raw", mesh, rules, llava=cfg, preprocess=preprocess
  )


def _hf_tokenizer(path: pathlib.Path) -> Tokenizer | None:
  """tokenizer.model (SentencePiece, exact where both are there), else tokenizer.json."""
  has_one = (path / tokenizer_lib.MODEL_FILE).is_file() or (path / TOKENIZER_JSON).is_file()
  return pipeline.load_tokenizer(str(path)) if has_one else None


def _load_llama2c(path, mesh, param_dtype, strategy) -> Model:
  cfg, variables = llama2c.load_model(str(path))
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype or cfg.param_dtype)
  _, shardings, rules = _placement(cfg, mesh, strategy or "tp")
  cast = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.param_dtype)), variables["params"])
  return Model(cfg, _put(cast, shardings), None, "raw", mesh, rules)


def _put(params: Any, shardings: Any) -> Any:
  return jax.tree.map(jax.device_put, params, shardings)


def _llama2c_tokenizer(model_path: pathlib.Path) -> llama2c_tokenizer.Tokenizer | None:
  """The llama2.c tokenizer beside a model file: `tokenizer.bin`, else the only `tok*.bin`."""
  folder = model_path.parent
  candidates = sorted(p for p in folder.glob("tok*.bin") if p != model_path)
  if (folder / llama2c_tokenizer.TOKENIZER_FILE).is_file():
    candidates = [folder / llama2c_tokenizer.TOKENIZER_FILE]
  if len(candidates) > 1:
    raise CheckpointError(
      f"{model_path}: several llama2.c tokenizers beside it "
      f"({', '.join(p.name for p in candidates)}); pass the one to use as tokenizer="
    )
  return llama2c_tokenizer.Tokenizer.load(str(candidates[0])) if candidates else None


# Format -> (the model without its tokenizer, the tokenizer found with it).
_FORMATS: dict[str, tuple[Callable[..., Model], Callable[[pathlib.Path], Tokenizer | None]]] = {
  "jaxtune": (_load_run, _run_tokenizer),
  "hf": (_load_hf, _hf_tokenizer),
  "llama2c": (_load_llama2c, _llama2c_tokenizer),
}

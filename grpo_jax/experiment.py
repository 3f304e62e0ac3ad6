"""An experiment run as library code: from an ml_collections config (the files in experiments/configs/) to
the task, tokenizer, model, rewards, environments and GRPOConfig, checked before anything expensive starts;
the supervised warm start; the Trainer (`build`); the main command's whole run (`run`); and a finished run's
policy read back (`load_run`) for evaluation and export.

  config = experiment.load_config("experiments/configs/arithmetic_tiny.py", **{"num_steps": 100})
  experiment.run(config, pathlib.Path("/tmp/grpo"))        # what experiments/train_grpo.py does

`run` writes to the workdir: checkpoints/, metrics.jsonl, TensorBoard events, plots.png, samples.jsonl (a few
completions every config.sample_every steps) and accuracy.json (held-out greedy accuracy when GRPO started
and at the end). Running it again resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import pathlib
import random
import shutil
import time

import jax
import numpy as np
from flax import nnx

from grpo_jax import environments, evaluation, multiturn, sft, sharding
from grpo_jax import lora as lora_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax import update as update_lib
from grpo_jax._validation import check_fields
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import SECTIONS, GRPOConfig, flatten
from grpo_jax.data import (
    PLAIN,
    R1_ZERO,
    REASONING_INSTRUCTIONS,
    ArithmeticTask,
    ChatTemplate,
    CountdownTask,
    TokenizedDataset,
    load_gsm8k,
    load_jsonl,
)
from grpo_jax.metrics import LOGGERS, plot_metrics, read_jsonl
from grpo_jax.models import (
    WRITE_TYPES,
    ModelConfig,
    Transformer,
    is_gguf,
    load_pretrained,
    pretrained_config,
    save_gguf_checkpoint,
)
from grpo_jax.models.gguf import tokenizer_fields as gguf_tokenizer_fields
from grpo_jax.sampling import prompt_sharding
from grpo_jax.tokenizers import Tokenizer, load_tokenizer
from grpo_jax.trainer import Trainer, check_same_run, train

REWARDS = {
    "accuracy": rewards_lib.accuracy_reward,
    "format": rewards_lib.format_reward,
    "format_strict": lambda prompts, completions, **fields: rewards_lib.format_reward(
        prompts, completions, strict=True),
    "language": rewards_lib.language_consistency_reward,
    "equation": rewards_lib.equation_reward,
}


TASKS = ("arithmetic", "countdown", "gsm8k", "jsonl")
TEMPLATES = {"plain": PLAIN, "r1_zero": R1_ZERO, "chat": ChatTemplate(system=REASONING_INSTRUCTIONS),
             "chat_default": ChatTemplate()}  # the chat template with its own default system message
# The experiment fields that define a run beyond GRPOConfig: a resume with any of them changed is refused.
RUN_FIELDS = ("task", "task_args", "template", "tokenizer", "checkpoint", "max_prompt_tokens", "rewards",
              "init_perturbation", "model", "warm_start")


EVAL_KEY = "eval/greedy_accuracy"  # the held-out accuracy in metrics.jsonl (config.eval_every)


def load_config(path: str | pathlib.Path, **overrides):
    """The ConfigDict of an experiment config file (a Python file with `get_config()`, as `--config=` takes
    it) with `overrides` set by dotted path: `load_config(path, **{"loss.beta": 0.04, "num_steps": 100})`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass one of experiments/configs/*.py.")
    spec = importlib.util.spec_from_file_location(f"grpo_jax_config_{next(_CONFIG_IDS)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.unlock()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        target = config
        for i, parent in enumerate(parents):
            if parent not in target:
                raise KeyError(f"config.{'.'.join(parents[:i + 1])} does not exist in {path}.")
            target = target[parent]
        if leaf not in target:
            raise KeyError(f"config.{dotted} does not exist in {path}.")
        target[leaf] = value
    return config


_CONFIG_IDS = itertools.count()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config) -> None:
    """The experiment's own fields (GRPOConfig checks its sections): ranges, names, files, in one pass before
    anything is loaded. Each error names the config path, the value and the fix."""
    def number(x):
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    if not config.tokenizer and not config.checkpoint:
        raise ValueError("config.tokenizer and config.checkpoint are both empty; pass "
                         "--config.checkpoint=/path/to/a/hugging/face/model (a local directory) or "
                         "--config.tokenizer=char.")
    ws = config.warm_start
    check_fields("config", [
        ("seed", config.seed, _is_int(config.seed), "must be an integer"),
        ("init_perturbation", config.init_perturbation,
         number(config.init_perturbation) and config.init_perturbation >= 0, "must be a finite number >= 0"),
        ("num_steps", config.num_steps, _is_int(config.num_steps) and config.num_steps >= 1,
         "must be an integer >= 1 (GRPO iterations)"),
        ("checkpoint_every", config.checkpoint_every,
         _is_int(config.checkpoint_every) and config.checkpoint_every >= 1,
         "must be >= 1 (GRPO steps between checkpoints; the last step is always saved)"),
        ("log_every", config.log_every, _is_int(config.log_every) and config.log_every >= 1, "must be >= 1"),
        ("sample_every", config.sample_every, _is_int(config.sample_every) and config.sample_every >= 0,
         "must be >= 0 (0: no sample completions)"),
        ("eval_examples", config.eval_examples, _is_int(config.eval_examples) and config.eval_examples >= 0,
         "must be >= 0 (0: no held-out evaluation)"),
        ("eval_every", config.get("eval_every", 0), _is_int(config.get("eval_every", 0)) and
         config.get("eval_every", 0) >= 0, "must be >= 0 (GRPO steps between held-out evaluations; 0: at "
         "the start and the end only)"),
        ("eval_batch_prompts", config.eval_batch_prompts,
         _is_int(config.eval_batch_prompts) and config.eval_batch_prompts >= 1, "must be >= 1"),
        ("max_prompt_tokens", config.max_prompt_tokens,
         _is_int(config.max_prompt_tokens) and config.max_prompt_tokens >= 1, "must be >= 1"),
        ("loggers", config.loggers,
         not isinstance(config.loggers, str) and set(config.loggers) <= set(LOGGERS),
         f"must be a tuple of names from {LOGGERS}, e.g. ('tensorboard', 'wandb')"),
        ("loggers", config.loggers, "wandb" not in config.loggers or importlib.util.find_spec("wandb"),
         "needs the wandb package: pip install wandb (or drop 'wandb')"),
        ("task", config.task, config.task in TASKS, f"is not a task; use one of {TASKS}"),
        ("tools", config.get("tools", ()), not isinstance(config.get("tools", ()), str) and
         set(config.get("tools", ())) <= set(environments.TOOLS),
         f"must be a tuple of tool names from {sorted(environments.TOOLS)}, e.g. ('calculator',)"),
        ("tools", config.get("tools", ()), not config.get("tools", ()) or config.env.max_turns >= 2,
         "needs config.env.max_turns >= 2: a tool's result is read in the next turn"),
        ("env.max_turns", config.env.max_turns, config.env.max_turns == 1 or config.get("tools", ()),
         "> 1 needs an environment: set config.tools, e.g. ('calculator',)"),
        ("template", config.template, config.template in TEMPLATES,
         f"is not a template; use one of {tuple(TEMPLATES)}"),
        ("rewards", config.rewards, bool(config.rewards) and all(
            len(r) == 2 and r[0] in REWARDS and number(r[1]) for r in config.rewards),
         f"must be (name, finite weight) pairs with names from {sorted(REWARDS)}"),
        ("checkpoint", config.checkpoint, not config.checkpoint or is_gguf(config.checkpoint) or
         (pathlib.Path(config.checkpoint).expanduser() / "config.json").is_file(),
         "is neither a .gguf file nor a Hugging Face model directory (no config.json in it); pass a local "
         ".gguf file, a directory holding config.json and *.safetensors, or \"\" for a random model"),
        ("tokenizer", config.tokenizer, config.tokenizer in ("", "char") or is_gguf(config.tokenizer) or
         pathlib.Path(config.tokenizer).expanduser().is_dir(),
         "must be \"char\", a local Hugging Face model directory, a .gguf file, or \"\" (config.checkpoint's "
         "tokenizer)"),
    ])
    check_fields("config.warm_start", [
        ("steps", ws.steps, _is_int(ws.steps) and ws.steps >= 0, "must be >= 0 (0: no warm start)"),
        ("batch_size", ws.batch_size, _is_int(ws.batch_size) and ws.batch_size >= 1, "must be >= 1"),
        ("learning_rate", ws.learning_rate, number(ws.learning_rate) and ws.learning_rate > 0,
         "must be a finite number > 0"),
        ("ema", ws.ema, number(ws.ema) and 0 <= ws.ema < 1, "must be in [0, 1) (0: no moving average)"),
        ("threshold", ws.threshold, number(ws.threshold) and 0 <= ws.threshold <= 1,
         "must be a held-out accuracy in [0, 1] (0: run all config.warm_start.steps)"),
        ("eval_every", ws.eval_every, _is_int(ws.eval_every) and ws.eval_every >= 1, "must be >= 1"),
        ("tool_fraction", ws.get("tool_fraction", 0.0), number(ws.get("tool_fraction", 0.0)) and
         0 <= ws.get("tool_fraction", 0.0) <= 1, "must be a share of demonstrations in [0, 1]"),
        ("tool_fraction", ws.get("tool_fraction", 0.0), not ws.get("tool_fraction", 0.0) or (
            config.task == "arithmetic" and "calculator" in config.get("tools", ())),
         "needs config.task='arithmetic' and 'calculator' in config.tools (its demonstrations call the "
         "calculator on the problem's operands)"),
    ])
    if config.task == "jsonl":
        for split in ("train", "test"):
            path = config.task_args.get(f"{split}_path", "")
            if not path or not pathlib.Path(path).is_file():
                raise ValueError(f"config.task_args.{split}_path={path!r} is not a file; config.task='jsonl' "
                                 "needs a JSONL file per split (GRPO trains on train_path, the held-out "
                                 "accuracy is measured on test_path).")
    if not config.checkpoint:
        try:
            ModelConfig(**config.model)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.model: {error}") from None


def check_workdir(workdir: pathlib.Path) -> None:
    """The workdir exists (created if needed) and takes files, before any work that would be lost."""
    probe = workdir / f".write_test_{jax.process_index()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        why = error.strerror or error
        raise ValueError(f"--workdir={str(workdir)!r} is not a writable directory ({why}); pass a directory "
                         "this user can create and write.") from None


def run_fingerprint(config) -> dict:
    """{config path: value} of RUN_FIELDS (and config.tools when set), compared with a checkpoint's when the
    run resumes."""
    names = RUN_FIELDS + (("tools",) if config.get("tools", ()) else ())
    fields = {name: config[name].to_dict() if hasattr(config[name], "to_dict") else config[name]
              for name in names}
    return flatten(json.loads(json.dumps(fields)))


def make_examples(config, split: str):
    args = dict(config.task_args)
    if config.task == "arithmetic":
        return ArithmeticTask(split=split, seed=config.seed, **args)
    if config.task == "countdown":
        return CountdownTask(split=split, seed=config.seed, **args)
    if config.task == "gsm8k":
        return load_gsm8k(split, **args)
    if config.task == "jsonl":
        paths = {s: args.pop(f"{s}_path", "") for s in ("train", "test")}
        return load_jsonl(paths[split], **args)
    raise ValueError(f"config.task={config.task!r} is not a task; use one of {TASKS}.")


def make_template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"config.template={name!r} is not a template; use one of {tuple(TEMPLATES)}.")
    return TEMPLATES[name]


def make_reward_fn(config, tokenizer: Tokenizer):
    """The configured text rewards, as the trainer's `(examples, completion token lists)` reward."""
    unknown = [name for name, _ in config.rewards if name not in REWARDS]
    if unknown:
        raise ValueError(f"config.rewards names {unknown}; known rewards are {sorted(REWARDS)}.")
    combined = rewards_lib.combine([(name, REWARDS[name], float(weight)) for name, weight in config.rewards])

    def reward_fn(examples, completions):
        texts = [tokenizer.decode(c) for c in completions]
        prompts = [e["prompt_text"] for e in examples]
        fields = {k: [e[k] for e in examples] for k in examples[0]
                  if k not in ("prompt", "prompt_text", "prompt_tokens")}
        return combined(prompts, texts, **fields)

    return reward_fn


def make_tokenizer(config) -> Tokenizer:
    """config.tokenizer: "char", a Hugging Face directory, or "" for config.checkpoint's own tokenizer."""
    return load_tokenizer(config.tokenizer or config.checkpoint)


def make_model(config, tokenizer: Tokenizer) -> Transformer:
    """config.checkpoint's model with config.model's fields overriding its config.json (dtypes, remat), or
    without a checkpoint a randomly initialised ModelConfig(**config.model)."""
    if config.checkpoint:
        model = load_pretrained(config.checkpoint, **config.model)
    else:
        model = Transformer(ModelConfig(**config.model), nnx.Rngs(config.seed))
    if config.init_perturbation:
        model = perturbed(model, config.init_perturbation, jax.random.key(config.seed + 1))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; raise config.model.vocab_size or change tokenizer.")
    return model


def perturbed(model: Transformer, scale: float, key: jax.Array) -> Transformer:
    """The model with N(0, scale^2) noise added to every parameter: the same seed on another trajectory, as
    another machine's rounding would give (experiments/robustness.py)."""
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def make_episodes(config, tokenizer: Tokenizer, grpo: GRPOConfig) -> multiturn.EpisodeSampler | None:
    """With config.tools: episodes of a `ToolEnv` over those tools, whose final answer is rewarded by
    config.rewards (the same text rewards as single-turn completions); None without tools."""
    if not config.get("tools", ()):
        return None
    # The observations' template and budget fit this tokenizer: checked before any model or warm start.
    environments.Observations(tokenizer, grpo.env.observation_template, grpo.env.max_observation_tokens)
    tools = [environments.TOOLS[name] for name in config.tools]
    combined = rewards_lib.combine([(name, REWARDS[name], float(weight)) for name, weight in config.rewards])

    def answer_reward(example, text: str) -> float:
        fields = {k: [v] for k, v in example.items() if k not in ("prompt", "prompt_text", "prompt_tokens")}
        scores, _ = combined([example["prompt_text"]], [text], **fields)
        return float(np.asarray(scores)[0])

    def make_env():
        return environments.ToolEnv(tools, tool_format=grpo.env.tool_format, timeout=grpo.env.tool_timeout,
                                    answer_reward=answer_reward)

    return multiturn.EpisodeSampler(make_env, tokenizer)


def held_out_accuracy(config, model: Transformer, tokenizer: Tokenizer, grpo: GRPOConfig) -> float:
    """Greedy accuracy on the first config.eval_examples distinct problems of the task's test split (a
    synthetic split may draw a problem twice; each counts once)."""
    return held_out(config, model, tokenizer, grpo)["greedy_accuracy"]


def held_out(config, model: Transformer, tokenizer: Tokenizer, grpo: GRPOConfig) -> dict[str, float]:
    """`held_out_accuracy` as {"greedy_accuracy"}; with config.tools, of greedy episodes, with their
    "tool_call_rate" (share of episodes calling a tool) too."""
    examples, chosen = make_examples(config, "test"), {}
    for i in range(len(examples)):
        if len(chosen) == config.eval_examples:
            break
        chosen.setdefault(examples[i]["prompt"], examples[i])
    buckets = grpo.sampling.buckets
    held_out = TokenizedDataset(list(chosen.values()), tokenizer, make_template(config.template),
                                max_prompt_tokens=min(config.max_prompt_tokens, max(buckets)))
    episodes = make_episodes(config, tokenizer, grpo)
    if episodes is not None:
        metrics = multiturn.evaluate_episodes(model, held_out, episodes, grpo.sampling, grpo.env,
                                              batch_prompts=config.eval_batch_prompts)
        return {"greedy_accuracy": metrics["accuracy"], "tool_call_rate": metrics.get("tool_call_rate", 0.0)}
    return {"greedy_accuracy": evaluation.evaluate(
        model, held_out, tokenizer, key=jax.random.key(config.seed), num_samples=0, ks=(),
        max_new_tokens=grpo.sampling.max_new_tokens, batch_prompts=config.eval_batch_prompts,
        buckets=buckets)["greedy_accuracy"]}


def supervised_warm_start(config, model: Transformer, dataset, tokenizer: Tokenizer, grpo: GRPOConfig,
                          workdir: pathlib.Path) -> Transformer:
    """Cold start: supervised training on "answer<eos>" completions until held-out greedy accuracy reaches
    config.warm_start.threshold (or config.warm_start.steps steps), so GRPO starts with reward signal.
    Writes its steps, seconds and accuracy to workdir/warm_start.json."""
    ws = config.warm_start
    tool_fraction = ws.get("tool_fraction", 0.0)
    observe = (environments.Observations(tokenizer, grpo.env.observation_template,
                                         grpo.env.max_observation_tokens) if tool_fraction else None)

    def target(example):
        answer = tokenizer.encode(example["answer"]) + [tokenizer.eos_id]
        # A share of the problems (the same ones every run) is demonstrated with a calculator call.
        if not tool_fraction or random.Random(f"tool/{example['prompt']}").random() >= tool_fraction:
            return answer
        a, b = example["operands"]
        expression = f"{a}{example['op']}{b}"
        call = tokenizer.encode(environments.format_tool_call(
            "calculator", {"expression": expression}, grpo.env.tool_format)) + [tokenizer.eos_id]
        result, cut = observe.encode(environments.calculator(expression))
        if cut:
            raise ValueError(f"config.env.max_observation_tokens={grpo.env.max_observation_tokens} cuts the "
                             f"calculator's result {environments.calculator(expression)} in the warm start's "
                             "demonstrations; raise it.")
        return call + result + answer, [True] * len(call) + [False] * len(result) + [True] * len(answer)

    start = time.time()
    model, history = sft.warm_start(
        model, dataset, target, steps=ws.steps, batch_size=ws.batch_size,
        learning_rate=ws.learning_rate, ema=ws.ema,
        max_target_tokens=grpo.completion_tokens(), buckets=grpo.sampling.buckets,
        pad_id=tokenizer.pad_id,
        evaluate=lambda m: held_out_accuracy(config, m, tokenizer, grpo), threshold=ws.threshold or None,
        eval_every=ws.eval_every, seed=config.seed, log_every=ws.eval_every,
        print_fn=lambda line: print(line, flush=True))
    last = history[-1]
    summary = {"steps": last["step"], "seconds": time.time() - start, "loss": last["loss"],
               "accuracy": last.get("eval")}
    print(f"warm start: {summary['steps']} steps in {summary['seconds']:.0f} s, loss {summary['loss']:.3f}, "
          f"held-out greedy accuracy {last.get('eval', float('nan')):.3f}", flush=True)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / "warm_start.json", summary)
    return model


def grpo_config(config, tokenizer: Tokenizer) -> GRPOConfig:
    """The run's GRPOConfig from config's sections, with the sampler's tokenizer fields filled in."""
    sections = {name: config[name].to_dict() for name in SECTIONS}
    sections["sampling"].update(stop_tokens=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
                                vocab_limit=tokenizer.vocab_size)
    return GRPOConfig.from_dict({**sections, "algo": config.algo, "num_steps": config.num_steps,
                                 "seed": config.seed})


def build(config, *, workdir: pathlib.Path | None = None, model: Transformer | None = None,
          resume: Checkpointer | None = None):
    """Everything a run needs, checked before any expensive work starts; with `workdir` (a fresh run), the
    model is first trained supervised (config.warm_start) before GRPO. `model`: start from it instead of
    config's (no warm start), e.g. one warm start shared by runs being compared. `resume`: the checkpoints
    the run will resume from; a checkpoint of another run is refused before any model or data loads."""
    check_config(config)
    tokenizer = make_tokenizer(config)
    grpo = grpo_config(config, tokenizer)
    fingerprint = run_fingerprint(config)
    if resume is not None:
        try:
            saved = resume.metadata()
        except Exception:  # noqa: BLE001 - an unreadable latest step: restore falls back past it later
            saved = None
        if saved is not None:
            check_same_run(saved, grpo, fingerprint, resume.directory, partial=True)
    mesh = sharding.make_mesh(config.mesh_shape)
    rollout_shape = config.get("rollout_mesh_shape", "")  # configs written before the field sample on `mesh`
    rollout_mesh = sharding.make_mesh(rollout_shape) if rollout_shape else None
    for field, m in (("mesh_shape", mesh), ("rollout_mesh_shape", rollout_mesh)):
        try:  # the sampler's own check, before any model or data is loaded
            prompt_sharding(m, grpo.rollout.num_prompts)
        except ValueError as error:
            raise ValueError(f"config.rollout.num_prompts and config.{field}: {error}") from None
    buckets = grpo.sampling.buckets
    max_prompt = min(config.max_prompt_tokens, max(buckets))
    dataset = TokenizedDataset(make_examples(config, "train"), tokenizer, make_template(config.template),
                               max_prompt_tokens=max_prompt)
    episodes = make_episodes(config, tokenizer, grpo)  # checks the observations before any model is built
    warm_start = workdir is not None and config.warm_start.steps and model is None
    model = make_model(config, tokenizer) if model is None else model
    if resume is not None and grpo.lora.enabled and saves_base(config):
        model = restore_base(model, resume.directory.parent / BASE_DIR)  # the warm start's, not a new one
    if max(buckets) + grpo.completion_tokens() > model.config.max_position_embeddings:
        raise ValueError(f"the largest prompt bucket {max(buckets)} + config.sampling.max_new_tokens="
                         f"{grpo.sampling.max_new_tokens} (x config.env.max_turns={grpo.env.max_turns}, with "
                         f"their observations: {grpo.completion_tokens()} tokens) exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}.")
    reward_fn = make_reward_fn(config, tokenizer)
    if warm_start:
        model = supervised_warm_start(config, model, dataset, tokenizer, grpo, workdir)
    if workdir is not None and grpo.lora.enabled and saves_base(config):
        save_base(nnx.split(model)[1], workdir / BASE_DIR)
    return Trainer(model, grpo, dataset, None if episodes else reward_fn, mesh=mesh,
                   rollout_mesh=rollout_mesh, fingerprint=fingerprint, episodes=episodes)


BASE_DIR = "base"  # under LoRA: the frozen base, when it is not config.checkpoint's weights as they are


def saves_base(config) -> bool:
    """Whether a LoRA run's base must be saved with the run: it is not config.checkpoint's weights as they
    are (a random model, a warm start, a perturbation)."""
    return not config.checkpoint or bool(config.warm_start.steps) or bool(config.init_perturbation)


def save_base(params, directory: pathlib.Path) -> None:
    """Save a LoRA run's frozen base params (in full precision, before any QLoRA quantization) as step 0 of
    their own checkpoint directory, which the run's checkpoints do not hold: a resumed run, evaluate.py and
    export.py read them back."""
    if jax.process_index() == 0 and directory.exists():
        shutil.rmtree(directory)  # a fresh run's base replaces any earlier run's
    with Checkpointer(directory) as checkpoints:
        checkpoints.save(0, {"params": params}, {"contents": "the frozen LoRA base params"}, force=True)


def restore_base(model: Transformer, directory: pathlib.Path, shardings=None) -> Transformer:
    """`model` (any params of the run's shapes, abstract ones too) with the params saved by `save_base`,
    laid out by `shardings` (default: whole on this process's first device; the Trainer lays them out)."""
    with Checkpointer(directory) as checkpoints:
        if checkpoints.latest_step() is None:
            raise FileNotFoundError(f"{directory} holds no base params; a LoRA run whose base is not "
                                    "config.checkpoint's weights as they are saves it there. Start the run "
                                    "over in a new --workdir.")
        graphdef, params = nnx.split(model)
        if shardings is None:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: local, params)
        restored, _, _ = checkpoints.restore({"params": _abstract(params, shardings)}, partial=True)
    return nnx.merge(graphdef, restored["params"])


def model_config(config) -> ModelConfig:
    """The run's ModelConfig, read from config alone (config.checkpoint's config.json or GGUF metadata with
    config.model's overrides, or config.model), without loading or initialising any weight."""
    if config.checkpoint:
        return pretrained_config(config.checkpoint, **config.model)
    return ModelConfig(**config.model)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_run(config, workdir: str | pathlib.Path):
    """A run's latest checkpoint as (base Transformer, adapters or None, step, base source). Under LoRA the
    base is the frozen model the adapters apply to (<workdir>/base, else config.checkpoint) and `source`
    says which ("workdir" or "checkpoint"); a full fine-tuning run's model is its trained params and the
    adapters are None. Only the policy's arrays are read (no optimizer state, critic or reference). Raises
    FileNotFoundError when a part is missing and ValueError when the checkpoint is of another config."""
    workdir = pathlib.Path(workdir)
    tokenizer = make_tokenizer(config)
    grpo = grpo_config(config, tokenizer)  # the run's config, checked before anything is read
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_config(config), nnx.Rngs(0))))
    mesh = sharding.make_mesh(config.mesh_shape)
    param_shardings = sharding.param_shardings(params, mesh)
    abstract = update_lib.abstract_train_state(params, grpo, mesh)[0].params  # the policy's or adapters
    directory = workdir / "checkpoints"
    if not directory.is_dir():  # Checkpointer would create the directory: only open one that exists
        raise FileNotFoundError(f"{directory} does not exist: pass the --workdir of a run (and train it).")
    with Checkpointer(directory) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}: train the run first.")
        try:  # the run first: a changed config would otherwise surface as mismatching arrays
            saved = checkpointer.metadata()
        except Exception:  # noqa: BLE001 - an unreadable latest step: restore falls back past it
            saved = None
        if saved is not None:
            _check_run_config(saved, grpo, config, directory)
        restored, metadata, step = checkpointer.restore({"params": abstract}, partial=True)
    _check_run_config(metadata, grpo, config, directory)
    trained = restored["params"]
    if not grpo.lora.enabled:
        return nnx.merge(graphdef, trained), None, step, "workdir"
    base_dir = workdir / BASE_DIR
    if base_dir.is_dir():
        base = nnx.split(restore_base(nnx.merge(graphdef, params), base_dir, param_shardings))[1]
        return nnx.merge(graphdef, _as_trained(base, grpo)), trained, step, "workdir"
    if saves_base(config):
        raise FileNotFoundError(
            f"{base_dir} not found: the run's base is not config.checkpoint's weights as they are (a random "
            "model, a warm start or a perturbation), and only <workdir>/base holds it. Pass the run's "
            "--workdir.")
    graphdef, params = nnx.split(make_model(config, tokenizer))  # as the run loaded it
    params = jax.tree.map(jax.device_put, params, sharding.param_shardings(params, mesh))
    return nnx.merge(graphdef, _as_trained(params, grpo)), trained, step, "checkpoint"


def _as_trained(base, grpo: GRPOConfig):
    """The base as the adapters were trained on it: under QLoRA, quantized and dequantized again."""
    if not grpo.lora.quantize:
        return base
    return jax.jit(lambda p: lora_lib.dequantize(lora_lib.quantize_base(p, grpo.lora)))(base)


def _check_run_config(metadata: dict, grpo, config, directory: pathlib.Path) -> None:
    try:
        check_same_run(metadata, grpo, run_fingerprint(config), directory, partial=True)
    except ValueError as error:
        raise ValueError(f"{str(error).split('. Use a new --workdir')[0]}. Pass the --config (and overrides) "
                         "the run trained with.") from None


def write_json(path: pathlib.Path, value) -> None:
    """Write `value` as JSON all at once: a reader never sees half a file, even after a kill -9."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value) + "\n")
    partial.replace(path)


def use_compilation_cache(directory: pathlib.Path) -> None:
    """Every compiled program (warm start, evaluation, sampler, train step) is kept in `directory` and
    loaded from there by later processes, however short their compilation was."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(config, workdir: pathlib.Path, *, stop_after: int | None = None) -> None:
    """The main command: checks, warm start (fresh runs), GRPO to config.num_steps (or `stop_after` steps),
    held-out accuracy before and after. Running it again resumes."""
    check_config(config)
    check_workdir(workdir)
    # The warm start is part of a fresh run only: a resumed run restores its checkpoint instead (a fresh run
    # saves step 0 right after it). Opening the checkpoints deletes a save that a kill cut short.
    with Checkpointer(workdir / "checkpoints") as checkpoints:
        fresh = checkpoints.latest_step() is None
        trainer = build(config, workdir=workdir if fresh else None, resume=None if fresh else checkpoints)
    tokenizer = trainer.dataset.tokenizer
    start_file = workdir / "accuracy_at_grpo_start.json"
    if config.eval_examples and fresh:  # the policy GRPO starts from (a resumed run wrote it when fresh)
        start = held_out(config, trainer.policy(), tokenizer, trainer.cfg)
        if jax.process_index() == 0:
            write_json(start_file, start)
    stop = config.num_steps if stop_after is None else min(stop_after, config.num_steps)
    eval_every = config.get("eval_every", 0) if config.eval_examples else 0  # older configs lack the field

    def evaluate() -> dict[str, float]:
        metrics = held_out(config, trainer.policy(), tokenizer, trainer.cfg)
        return {f"eval/{name}": value for name, value in metrics.items()}

    history = train(trainer, workdir, stop, checkpoint_every=config.checkpoint_every,
                    log_every=config.log_every, sample_every=config.sample_every, loggers=config.loggers,
                    run_name=workdir.name, run_config=config.to_dict(), evaluate=evaluate,
                    eval_every=eval_every)
    # Every process evaluates (the sampler's batch is sharded over all of them); process 0 reports.
    end = None
    if config.eval_examples:  # the last step's evaluation when it had one
        end = history[-1][EVAL_KEY] if history and EVAL_KEY in history[-1] else evaluate()[EVAL_KEY]
    if jax.process_index() != 0:
        return
    records = read_jsonl(workdir / "metrics.jsonl")
    start_metrics = json.loads(start_file.read_text()) if start_file.exists() else {}
    start = start_metrics.get("greedy_accuracy")
    per_reward = [f"reward/{name}" for name, _ in config.rewards] if len(config.rewards) > 1 else []
    keys = [k for k in ("reward_mean", *per_reward, EVAL_KEY, "eval/tool_call_rate", "kl",
                        "completion_length_mean") if any(k in r for r in records)]
    curves = records if start is None or not eval_every else [
        {"step": 0, **{f"eval/{k}": v for k, v in start_metrics.items()}}, *records]
    plot_metrics(curves, keys, workdir / "plots.png", title=workdir.name)
    first, last = records[0]["reward_mean"], np.mean([r["reward_mean"] for r in records[-5:]])
    print(f"reward: first step {first:.3f}, mean of the last 5 steps {last:.3f}; plots in "
          f"{workdir / 'plots.png'}")
    if end is not None:
        write_json(workdir / "accuracy.json",
                   {"start": start, "end": end, "step": trainer.step, "examples": config.eval_examples})
        summary = f"held-out greedy accuracy on {config.eval_examples} test problems: "
        if start is None:
            print(f"{summary}{end:.1%} after {trainer.step} steps")
        else:
            print(f"{summary}{start:.1%} when GRPO started -> {end:.1%} after {trainer.step} steps "
                  f"({100 * (end - start):+.1f} points)")


# Files of a Hugging Face tokenizer directory that travel with an exported model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def export(config, workdir: str | pathlib.Path, out: str | pathlib.Path, *, adapters_only: bool = False,
           file_format: str = "hf", gguf_type: str = "F16") -> dict:
    """Write the run's policy to `out` (see the module docstring); returns what was written: {"step",
    "out", "format" ("merged", "gguf" or "adapters"), "base" (the base model's path or name, adapters
    only)}."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={str(out)!r} exists and is not an empty directory; pass a new directory "
                         "(an export never mixes its files with an earlier one's).")
    if file_format not in ("hf", "gguf") or gguf_type not in WRITE_TYPES:
        raise ValueError(f"--format={file_format!r} --gguf_type={gguf_type!r}: use --format=hf or gguf and "
                         f"--gguf_type of {WRITE_TYPES}.")
    if adapters_only and file_format == "gguf":
        raise ValueError("--adapters_only writes PEFT adapters, not a GGUF; drop one of --adapters_only and "
                         "--format=gguf.")
    tokenizer = make_tokenizer(config)
    grpo = grpo_config(config, tokenizer)
    if adapters_only and not grpo.lora.enabled:
        raise ValueError("--adapters_only: the run trained every weight (config.lora.rank=0), it has no "
                         "adapters; drop --adapters_only to export its model.")
    if file_format == "gguf":
        gguf_tokenizer_fields(tokenizer)  # a tokenizer GGUF cannot hold is refused before the run is read
    model, adapters, step, source = load_run(config, workdir)
    if file_format == "gguf":
        out.mkdir(parents=True, exist_ok=True)
        policy = model if adapters is None else lora_lib.merged(model, adapters, grpo.lora)
        save_gguf_checkpoint(policy, out / "model.gguf", tokenizer, file_type=gguf_type)
        return {"step": step, "out": str(out / "model.gguf"), "format": "gguf"}
    result = {"step": step, "out": str(out), "format": "adapters" if adapters_only else "merged"}
    if adapters_only:
        unchanged = source == "checkpoint" and not config.init_perturbation
        if unchanged:
            base_model = config.checkpoint
        else:  # the adapters are of use only with their base: it goes along as a Hugging Face checkpoint
            base_model = str((out / BASE_DIR).absolute())
            lora_lib.export_merged(model, out / BASE_DIR)
            _copy_tokenizer(config, out / BASE_DIR)
        lora_lib.export_adapters(adapters, grpo.lora, out, base_model=base_model)
        result["base"] = base_model
    else:
        lora_lib.export_merged(model, out, adapters, grpo.lora if adapters is not None else None)
    _copy_tokenizer(config, out)
    return result


def _copy_tokenizer(config, out: pathlib.Path) -> None:
    source = config.tokenizer if config.tokenizer not in ("", "char") else config.checkpoint
    if not source or not pathlib.Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (pathlib.Path(source) / name).is_file():
            shutil.copyfile(pathlib.Path(source) / name, out / name)

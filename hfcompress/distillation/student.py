"""Building a student: a teacher with fewer blocks (the DistilBERT recipe), or a smaller config.

Both return `(student, layer_map)`, where `layer_map` says which teacher block each student block learns from
(`{student_layer: teacher_layer}`); the hidden-state and attention losses use it.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig, PreTrainedModel

from ..errors import HfCompressError, first_line
from ..sources import load_config
from .architectures import layer_list_path, select_per_layer_lists
from .layer_maps import Strategy, layers_to_keep, uniform_layer_map

# Fields of the teacher's config that describe the task head; a student initialised from another checkpoint
# must predict the same labels.
TASK_HEAD_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")


def student_from_layers(
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    strategy: Strategy = "uniform",
) -> tuple[PreTrainedModel, dict[int, int]]:
    """A copy of the teacher keeping only some of its blocks: embeddings, kept blocks, final norm and task head.

    The student is built from the teacher's config with fewer layers, so everything the model derives from the
    config (block numbering for the KV cache, per-layer attention types) describes the student; then the teacher's
    weights are copied in. (GPT-2 with `scale_attn_by_inverse_layer_idx` scales attention by the new position.)
    """
    kept = layers_to_keep(teacher.config.num_hidden_layers, layers, num_layers, strategy)
    student = build_model(type(teacher), layer_subset_config(teacher.config, kept))
    student = student.to(device=teacher.device, dtype=teacher.dtype)
    student.load_state_dict(_weights_of_kept_layers(teacher, kept))
    if teacher.can_generate():
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student, dict(enumerate(kept))


def student_from_config(
    teacher_config: PretrainedConfig,
    overrides: dict,
    model_class,
    init_from: str | None = None,
) -> tuple[PreTrainedModel, dict[int, int]]:
    """A student from a config: the teacher's (or `init_from`'s) config with `overrides` applied.

    Without `init_from` the student is randomly initialised; with it, the weights come from that checkpoint
    (its own config is the starting point, and the task head follows the teacher's labels). The layer map
    spaces the student's blocks evenly over the teacher's.
    """
    config, layer_map = student_config(teacher_config, overrides, init_from)
    if init_from is None:
        return build_model(model_class, config), layer_map
    try:
        student = model_class.from_pretrained(init_from, config=config)
    except (OSError, ValueError, RuntimeError) as error:
        reason = first_line(error)
        raise HfCompressError(f"student: cannot load {init_from!r} with the student config: {reason}") from None
    return student, layer_map


def layer_subset_config(teacher_config: PretrainedConfig, kept: list[int]) -> PretrainedConfig:
    """The teacher's config for a student that keeps the teacher blocks `kept`."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(kept)
    select_per_layer_lists(config, kept)
    return config


def student_config(
    teacher_config: PretrainedConfig, overrides: dict, init_from: str | None = None
) -> tuple[PretrainedConfig, dict[int, int]]:
    """The config of a `config_overrides` student (see `student_from_config`) and its layer map."""
    if init_from is None:
        config = copy.deepcopy(teacher_config)
    else:
        config = load_config(init_from, "student")
        for name in TASK_HEAD_FIELDS:
            if hasattr(teacher_config, name):
                setattr(config, name, copy.deepcopy(getattr(teacher_config, name)))
    _apply_overrides(config, overrides)
    layer_map = uniform_layer_map(config.num_hidden_layers, teacher_config.num_hidden_layers)
    select_per_layer_lists(config, list(layer_map.values()))
    return config, layer_map


def check_same_vocabulary(
    teacher_tokenizer,
    student_tokenizer,
    teacher_config: PretrainedConfig | None = None,
    student_config: PretrainedConfig | None = None,
) -> None:
    """Refuse a student whose vocabulary differs: both models read the same token ids, and token-level
    distillation compares their distributions over the same vocabulary."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        all_tokens = sorted(teacher_vocab.keys() | student_vocab.keys())
        token = next(t for t in all_tokens if teacher_vocab.get(t) != student_vocab.get(t))
        raise HfCompressError(
            f"the student's tokenizer ({len(student_vocab)} tokens) differs from the teacher's ({len(teacher_vocab)} "
            f"tokens; e.g. {token!r} is id {student_vocab.get(token)} vs {teacher_vocab.get(token)}): "
            "distillation needs a shared vocabulary"
        )
    if teacher_config is not None and student_config is not None:
        check_same_vocab_size(teacher_config, student_config)


def check_same_vocab_size(teacher_config: PretrainedConfig, student_config: PretrainedConfig) -> None:
    if teacher_config.vocab_size != student_config.vocab_size:
        raise HfCompressError(
            f"the student's vocab_size ({student_config.vocab_size}) differs from the teacher's "
            f"({teacher_config.vocab_size}): distillation needs a shared vocabulary"
        )


def _weights_of_kept_layers(teacher: PreTrainedModel, kept: list[int]) -> dict:
    """The teacher's state dict with the kept blocks renumbered 0..n-1 and the others left out."""
    prefix = layer_list_path(teacher) + "."
    new_index = {teacher_index: student_index for student_index, teacher_index in enumerate(kept)}
    weights = {}
    for key, tensor in teacher.state_dict().items():
        if not key.startswith(prefix):
            weights[key] = tensor
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) in new_index:
            weights[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
    return weights


def _apply_overrides(config: PretrainedConfig, overrides: dict) -> None:
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise HfCompressError(f"student config: {config.model_type} configs have no setting {name!r}")
        setattr(config, name, value)


def build_model(model_class, config: PretrainedConfig) -> PreTrainedModel:
    # Auto classes build with `from_config`; concrete model classes with `_from_config` (which honours the config's
    # attention implementation and dtype).
    build = getattr(model_class, "from_config", None) or model_class._from_config
    try:
        return build(config)
    except (ValueError, TypeError, AssertionError) as error:
        reason = first_line(error)
        raise HfCompressError(f"student config: cannot build a {config.model_type} model: {reason}") from None


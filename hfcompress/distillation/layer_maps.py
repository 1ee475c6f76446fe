"""Which teacher blocks a student keeps, and which teacher block each student block learns from."""

from __future__ import annotations

from typing import Literal

from ..errors import HfCompressError

Strategy = Literal["every_other", "first", "last", "uniform"]
STRATEGIES = ("every_other", "first", "last", "uniform")


def uniform_layer_indices(num_student: int, num_teacher: int) -> list[int]:
    """Evenly spaced teacher blocks ending with the last one: student i -> round((i+1)*T/S) - 1."""
    if not 1 <= num_student <= num_teacher:
        raise HfCompressError(
            f"cannot space {num_student} student layers over {num_teacher} teacher layers: give a layer_map"
        )
    return [round((index + 1) * num_teacher / num_student) - 1 for index in range(num_student)]


def uniform_layer_map(num_student: int, num_teacher: int) -> dict[int, int]:
    return dict(enumerate(uniform_layer_indices(num_student, num_teacher)))


def layers_to_keep(
    num_teacher: int, layers: list[int] | None = None, num_layers: int | None = None, strategy: Strategy = "uniform"
) -> list[int]:
    """The teacher blocks a student keeps, in order: `layers` as given, or `num_layers` chosen by `strategy`."""
    if layers is not None:
        if num_layers is not None:
            raise HfCompressError("give either layers or num_layers, not both")
        return _checked_layers(layers, num_teacher)
    if strategy not in STRATEGIES:
        raise HfCompressError(f"unknown layer strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "every_other":  # the DistilBERT recipe: blocks 0, 2, 4, ...
        kept = list(range(0, num_teacher, 2))
        if num_layers is not None and num_layers != len(kept):
            raise HfCompressError(
                f"every_other keeps {len(kept)} of {num_teacher} layers, not {num_layers}: drop num_layers"
            )
        return kept
    if num_layers is None:
        raise HfCompressError(f"strategy {strategy!r} needs num_layers")
    if not 1 <= num_layers <= num_teacher:
        raise HfCompressError(f"num_layers must be between 1 and {num_teacher} (the teacher's layers): {num_layers}")
    if strategy == "first":
        return list(range(num_layers))
    if strategy == "last":
        return list(range(num_teacher - num_layers, num_teacher))
    return uniform_layer_indices(num_layers, num_teacher)


def check_layer_map(layer_map: dict[int, int], num_student: int, num_teacher: int) -> None:
    for student_layer, teacher_layer in layer_map.items():
        if not 0 <= student_layer < num_student:
            raise HfCompressError(f"layer_map: student layer {student_layer} out of range ({num_student} layers)")
        if not 0 <= teacher_layer < num_teacher:
            raise HfCompressError(f"layer_map: teacher layer {teacher_layer} out of range ({num_teacher} layers)")


def _checked_layers(layers: list[int], num_teacher: int) -> list[int]:
    if not layers:
        raise HfCompressError("layers: keep at least one layer")
    if len(set(layers)) != len(layers):
        raise HfCompressError(f"layers: {layers} names a layer twice")
    out_of_range = [index for index in layers if not 0 <= index < num_teacher]
    if out_of_range:
        raise HfCompressError(f"layers: layer {out_of_range[0]} out of range (the teacher has {num_teacher})")
    return sorted(layers)

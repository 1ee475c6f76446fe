"""hfcompress: turn a large Hugging Face transformer into a small, fast one, driven by a YAML recipe."""

from .errors import HfCompressError
from .modeling import from_pretrained
from .pipeline import run as run_pipeline
from .recipe import Recipe, load_recipe
from .run_dir import RunResults

__version__ = "0.1.0"


def run(recipe: Recipe | str, output_dir=None, training_hooks=None) -> RunResults:
    """Run a recipe (a Recipe or a path to a YAML file); returns the run's results. `training_hooks`:
    `hfcompress.training.TrainingHook`s every training stage calls (after each optimizer step, ...)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run_pipeline(recipe, output_dir=output_dir, training_hooks=training_hooks)


__all__ = ["HfCompressError", "Recipe", "from_pretrained", "load_recipe", "run", "__version__"]

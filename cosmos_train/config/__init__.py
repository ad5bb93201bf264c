from cosmos_train.config.load import load_recipe, load_saved_recipe, recipe_to_yaml, save_recipe, validate
from cosmos_train.config.schema import RecipeConfig

__all__ = ["RecipeConfig", "load_recipe", "load_saved_recipe", "recipe_to_yaml", "save_recipe", "validate"]

"""Build recipes, installed as `toma_export.recipes` (pyproject maps this folder) so that an installed
toolkit finds them; toma_export/resources.py locates them."""

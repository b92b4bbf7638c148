"""SRMIR (SPEC B): a balanced Chain-of-Draft safety dataset, one shadow reward model per harm
category, and their linear / categorized ensemble."""

from lit_align.srmir.categories import CATEGORIES, OTHER, PromptSource, map_category

__all__ = ["CATEGORIES", "OTHER", "PromptSource", "map_category"]

"""Routing policy: gating rules, the category-to-expert table, a request's plan and its verdict (pure)."""

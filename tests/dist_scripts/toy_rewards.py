"""A verifiable toy reward for the distributed GRPO run (importable as "toy_rewards:a_fraction")."""


def a_fraction(prompts, completions, **columns):
    """The share of characters that are 'a': varies between completions, so advantages are non-zero."""
    return [c.count("a") / max(len(c), 1) for c in completions]
